//! `esvm bench migrate`: live migration of the demo guest between two machines of this
//! process over loopback TCP, through the same code as `esvm ctl migrate` / `esvm receive`
//! (`MachineSource`, `MachineTarget`, the protocol's sender and receiver).

use std::error::Error;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use esvm_hv::sev::Launcher;
use esvm_hv::{BackendKind, VmType};
use esvm_migration::{Receiver, ReceiverConfig, SendOutcome, Sender, SenderConfig};
use esvm_psp::{LaunchStart, Policy, Psp};

use esvm::machine::{Machine, MachineConfig, MachineHandle};
use esvm::migrate::{MachineSource, MachineTarget};
use esvm::outcome::Outcome;

#[derive(Args, Debug)]
pub struct MigrateBenchArgs {
    /// Guest memory sizes, comma-separated, e.g. 256M,1G (a bare number means MiB). Each
    /// must hold the guest and its dirty buffer
    /// (--dirty-mib); sizes are checked before the first migration starts.
    #[arg(long, default_value = "256M,1G", value_delimiter = ',', value_parser = parse_bytes)]
    pub sizes: Vec<u64>,
    /// The dirtying workload's buffer: the demo guest rewrites one word in each of 16 pages
    /// of it per iteration, cycling through the whole buffer.
    #[arg(long, default_value_t = 32)]
    pub dirty_mib: u64,
    /// Downtime limit of the pre-copy engine, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// How long the guest runs before the migration starts, in milliseconds; its
    /// instructions per second over this time are the row's guest MIPS.
    #[arg(long, default_value_t = 500)]
    pub warmup_ms: u64,
    /// Migrations per scenario; the row shows the one with the median first-pass
    /// throughput.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Which guests to migrate: `plain`, `sev-es` or both (comma-separated).
    #[arg(long, default_value = "plain,sev-es", value_delimiter = ',', value_parser = ["plain", "sev-es"])]
    pub guests: Vec<String>,
    /// Migrate a booted Linux instead of the demo guest: this kernel (bzImage), booted with
    /// --initrd to an idle shell (`scripts/linux-assets.sh` fetches both), migrated once its
    /// userland is up.
    #[arg(long, value_name = "PATH", requires = "initrd")]
    pub kernel: Option<std::path::PathBuf>,
    /// The initramfs for --kernel (esvm's, with its init).
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<std::path::PathBuf>,
    /// Transports to measure each scenario over, comma-separated: `tcp` (plain loopback
    /// TCP) and/or `tls` (TLS 1.3 with mutual authentication over loopback TCP, test
    /// certificates made for the run; the handshake counts in the total time). With both,
    /// each scenario's rows are side by side, and the AES-128-GCM rate of this machine is
    /// printed as the reference.
    #[arg(long, default_value = "tcp", value_delimiter = ',', value_parser = ["tcp", "tls"])]
    pub transport: Vec<String>,
    /// Migration modes: `precopy` (the default: the full table of scenarios) and/or
    /// `postcopy`. With `postcopy` the table compares the modes on the dirtying workload
    /// only (--dirty-mib): pre-copy (stop-and-copy forced at --max-passes if it cannot
    /// converge) beside post-copy (switch after --postcopy-after passes; the guest runs at
    /// the destination and faults its missing pages in). Use --max-bandwidth to make the
    /// link slower than the guest dirties memory.
    #[arg(long, default_value = "precopy", value_delimiter = ',', value_parser = ["precopy", "postcopy"])]
    pub mode: Vec<String>,
    /// Cap the migration's bandwidth (per second; a bare number means MiB/s, e.g. 32 or
    /// 32M), as `esvm ctl migrate --max-bandwidth` does.
    #[arg(long, value_name = "RATE", value_parser = parse_bytes)]
    pub max_bandwidth: Option<u64>,
    /// Pre-copy passes before post-copy switches (--mode postcopy).
    #[arg(long, value_name = "PASSES", default_value_t = 1)]
    pub postcopy_after: u32,
    /// Most pre-copy passes; at the cap stop-and-copy is forced (whatever the downtime).
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub max_passes: u32,
}

/// Bytes the guest runtime may allocate before the demo takes its dirty buffer (an SEV-ES
/// guest splits huge pages into page tables of its own to share its GHCB).
const RUNTIME_RESERVE: u64 = 64 << 10;

/// Why `bench migrate` refused its arguments.
#[derive(Debug, thiserror::Error)]
pub enum MigrateBenchError {
    #[error("--sizes {}: the {guest} guest has {} free there, too little for its {dirty_mib} MiB dirty buffer (--dirty-mib); give sizes of at least {} or a smaller --dirty-mib", format_size(*size), format_size(*free), format_size(*min))]
    TooSmall {
        size: u64,
        guest: &'static str,
        dirty_mib: u64,
        free: u64,
        min: u64,
    },
    #[error("--sizes {}: the {guest} guest does not load into that much memory; give a larger size", format_size(*size))]
    Load {
        size: u64,
        guest: &'static str,
        #[source]
        source: esvm::machine::MachineError,
    },
    #[error("--sizes {}: an SEV-ES Linux guest needs at least {} (its kernel's bounce buffer for device I/O); give larger sizes or --guests plain", format_size(*size), format_size(crate::cli::run::MIN_SEV_LINUX_MEM))]
    SevLinuxTooSmall { size: u64 },
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

use esvm::size::format_size;

/// The command line of a migrated Linux: esvm's init runs a shell, which idles.
const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 cryptomgr.notests esvm.run=shell";
/// What the Linux guest prints once its userland runs.
const LINUX_UP: &[u8] = b"esvm-init: userland up";

/// A guest console that remembers whether the Linux guest's userland is up.
struct WatchedConsole(Arc<std::sync::atomic::AtomicBool>, Vec<u8>);

impl std::io::Write for WatchedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(buf);
        if self.1.windows(LINUX_UP.len()).any(|w| w == LINUX_UP) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            self.1.clear();
        } else if self.1.len() > 4096 {
            self.1.drain(..self.1.len() - LINUX_UP.len());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The Linux kernel and initrd to migrate.
#[derive(Clone)]
struct LinuxGuest {
    kernel: Arc<Vec<u8>>,
    initrd: Arc<Vec<u8>>,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    esvm::size::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    /// An SEV-ES guest: pages and VMSAs through SEND_*/RECEIVE_* of two platforms.
    sev_es: bool,
    mem_mib: u64,
    mem_bytes: u64,
    workload: String,
    /// Every page was written (pseudo-random bytes) before boot, so all memory travels.
    populated: bool,
    /// The destination preallocated its guest memory at setup (`esvm receive --prealloc`).
    prealloc: bool,
    /// The guest was stopped during the whole migration (transport alone).
    stopped: bool,
    passes: u32,
    pages_sent: u64,
    bytes_sent: u64,
    first_pass_gib_s: f64,
    overall_gib_s: f64,
    total_ms: f64,
    final_pass_pages: u64,
    estimated_downtime_ms: Option<f64>,
    downtime_ms: f64,
    /// Guest instructions per second (millions) on the source during the warm-up before
    /// the migration, counted exactly between two stops of the vCPU (the demo guest is a
    /// busy CPU loop in every workload; an idle Linux mostly halts).
    source_mips: f64,
    /// `tcp` or `tls`.
    transport: &'static str,
    /// `pre-copy` or `post-copy`.
    mode: &'static str,
    /// The bandwidth cap, bytes per second.
    max_bandwidth: Option<u64>,
    /// Whether pre-copy hit the pass cap and forced stop-and-copy.
    forced: bool,
    /// Post-copy: from the start of the migration until the guest ran at the destination.
    switch_ms: Option<f64>,
    /// Post-copy: accesses of the destination's guest that waited for a missing page.
    demand_faults: Option<u64>,
    /// Post-copy: their total wait, milliseconds.
    fault_wait_ms: Option<f64>,
    /// Post-copy: pages missing when the destination's guest started.
    postcopy_pages: Option<u64>,
}

/// What the destination thread hands back: the machine, and post-copy's demand-fault
/// figures (if it switched).
type Received = (Machine, Option<esvm_hv::MissingStats>);

/// What `bench migrate` prints.
#[derive(Debug, Clone, serde::Serialize)]
struct MigrateReport {
    /// `demo` or `linux`.
    guest: &'static str,
    backend: &'static str,
    downtime_limit_ms: u64,
    warmup_ms: u64,
    /// Migrations per row (the row is the median).
    repeat: u32,
    /// This machine's rate for fresh anonymous memory (a cold destination's ceiling).
    fault_in_gib_s: f64,
    /// AES-128-GCM sealing rate of one core (ring), when TLS is measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    aes_128_gcm_gib_s: Option<f64>,
    rows: Vec<Row>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Fill all of guest memory with pseudo-random bytes (a VMM-side write: logged).
fn populate(m: &Machine, seed: u64) -> Result<(), Box<dyn std::error::Error>> {
    let mem = m.vm().memory();
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 4 << 20];
    let mut addr = 0;
    while addr < mem.size() {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = (mem.size() - addr).min(chunk.len() as u64) as usize;
        mem.write(addr, &chunk[..n])?;
        addr += n as u64;
    }
    Ok(())
}

type SourceResult = Result<(Outcome, Machine), String>;

/// LAUNCH_* for a benchmark source with all of guest memory measured (so that a
/// populated memory is all private and every page travels as a SEND_UPDATE_DATA packet).
fn launch_whole_memory(m: &mut Machine, psp: Arc<Mutex<Psp>>) -> Result<(), Box<dyn Error>> {
    let mut launcher = Launcher::new(m.vm().clone())?.start(
        psp,
        &LaunchStart {
            policy: Policy(Policy::ES),
            owner: None,
            share_key_with: None,
        },
    )?;
    launcher.update_data(0, m.config().mem_size)?;
    m.launch_update_vmsas(&mut launcher)?;
    launcher.measure()?.finish()?;
    Ok(())
}

type Platform = Arc<Mutex<Psp>>;

/// Two platforms under one emulated AMD root (created once per benchmark run).
fn platforms() -> Result<(Platform, Platform), Box<dyn Error>> {
    static CA: std::sync::OnceLock<esvm_psp::EmulatedAmdCa> = std::sync::OnceLock::new();
    let ca = match CA.get() {
        Some(ca) => ca,
        None => {
            let ca = esvm_psp::EmulatedAmdCa::generate(2048)?;
            CA.get_or_init(|| ca)
        }
    };
    let make = || -> Result<Arc<Mutex<Psp>>, Box<dyn Error>> {
        let mut p = Psp::ephemeral(ca, Default::default())?;
        p.init()?;
        Ok(Arc::new(Mutex::new(p)))
    };
    Ok((make()?, make()?))
}

/// Start the demo guest (SEV-ES: `sevdemo` launched on `sev`) on a source machine in its
/// own thread.
type Started = (
    MachineHandle,
    std::thread::JoinHandle<SourceResult>,
    Arc<std::sync::atomic::AtomicBool>,
);

fn start_source(
    mem: u64,
    dirty_mib: u64,
    fill: bool,
    sev: Option<Arc<Mutex<Psp>>>,
    linux: Option<LinuxGuest>,
) -> Result<Started, Box<dyn std::error::Error>> {
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let console = WatchedConsole(up.clone(), Vec::new());
    let (tx, rx) = mpsc::channel();
    let t = std::thread::Builder::new()
        .name("bench-vcpu".into())
        .spawn(move || -> SourceResult {
            let setup = || -> Result<Machine, Box<dyn std::error::Error>> {
                let config = MachineConfig {
                    backend: BackendKind::Emu,
                    vm_type: if sev.is_some() {
                        VmType::SevEs
                    } else {
                        VmType::Plain
                    },
                    mem_size: mem,
                    vcpus: 1,
                    max_instructions: None,
                };
                let mut m = Machine::new(&config, Box::new(console))?;
                if let Some(linux) = linux {
                    let boot = m.load_linux(&esvm_loader::linux::LinuxImage {
                        name: "bench kernel",
                        kernel: &linux.kernel,
                        initrd: Some(&linux.initrd),
                        cmdline: LINUX_CMDLINE,
                    })?;
                    if let Some(psp) = sev {
                        esvm::sev_launch::launch_on(
                            &mut m,
                            &boot.written_pages(),
                            psp,
                            &esvm::sev_launch::SevLaunchArgs {
                                platform: std::path::Path::new(""),
                                session: None,
                                measurement_out: None,
                                secret: None,
                                policy: None,
                            },
                        )?;
                    }
                    return Ok(m);
                }
                if fill {
                    populate(&m, mem ^ dirty_mib)?;
                }
                let name = if sev.is_some() { "sevdemo" } else { "demo" };
                let guest = esvm_guests::builtin(name).ok_or("the demo guest is missing")?;
                m.load(
                    guest.elf,
                    &format!("iterations=1000000000000000 dirty-mib={dirty_mib}"),
                )?;
                if let Some(psp) = sev {
                    launch_whole_memory(&mut m, psp)?;
                }
                Ok(m)
            };
            let mut m = match setup() {
                Ok(m) => m,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Err(e.to_string());
                }
            };
            let _ = tx.send(Ok(m.handle()));
            let outcome = m.run().map_err(|e| e.to_string())?;
            Ok((outcome, m))
        })?;
    let h = rx.recv()??;
    Ok((h, t, up))
}

/// The guest's speed over `warmup`: the run loop publishes its instruction count only
/// between slices of up to 10 M instructions, so the count is read with the vCPU stopped
/// (then it is exact) before and after, and the time is the time it ran in between.
fn guest_mips(h: &MachineHandle, warmup: Duration) -> Result<f64, Box<dyn Error>> {
    let stopped = h.control.stop(esvm::runctl::PARK_TIMEOUT)?;
    let i0 = h.control.instructions();
    drop(stopped);
    let t0 = Instant::now();
    std::thread::sleep(warmup);
    let stopped = h.control.stop(esvm::runctl::PARK_TIMEOUT)?;
    let secs = t0.elapsed().as_secs_f64();
    let i1 = h.control.instructions();
    drop(stopped);
    Ok(i1.saturating_sub(i0) as f64 / secs / 1e6)
}

/// Refuse sizes the guests cannot run at, before any migration: load each guest the
/// scenarios run into a machine of each size (guest memory is reserved lazily, so this is
/// cheap) and check the room left for the dirty buffer.
fn check_sizes(
    args: &MigrateBenchArgs,
    linux: Option<&LinuxGuest>,
) -> Result<(), MigrateBenchError> {
    let wants = |g: &str| args.guests.iter().any(|x| x == g);
    for &size in &args.sizes {
        let config = MachineConfig {
            backend: BackendKind::Emu,
            vm_type: VmType::Plain,
            mem_size: size,
            vcpus: 1,
            max_instructions: None,
        };
        if let Some(linux) = linux {
            if wants("sev-es") && size < crate::cli::run::MIN_SEV_LINUX_MEM {
                return Err(MigrateBenchError::SevLinuxTooSmall { size });
            }
            let load = || -> Result<(), esvm::machine::MachineError> {
                let mut m = Machine::new(&config, Box::new(std::io::sink()))?;
                m.load_linux(&esvm_loader::linux::LinuxImage {
                    name: "bench kernel",
                    kernel: &linux.kernel,
                    initrd: Some(&linux.initrd),
                    cmdline: LINUX_CMDLINE,
                })?;
                Ok(())
            };
            load().map_err(|source| MigrateBenchError::Load {
                size,
                guest: "Linux",
                source,
            })?;
            continue;
        }
        for (kind, guest, reserve) in [("plain", "demo", 0), ("sev-es", "sevdemo", RUNTIME_RESERVE)]
        {
            if !wants(kind) {
                continue;
            }
            let load = || -> Result<u64, esvm::machine::MachineError> {
                let elf = esvm_guests::builtin(guest)
                    .map(|g| g.elf)
                    .unwrap_or_default();
                let mut m = Machine::new(&config, Box::new(std::io::sink()))?;
                let bi = m.load(elf, "")?.boot_info;
                Ok(bi.mem_size.saturating_sub(bi.free_start))
            };
            let free = load().map_err(|source| MigrateBenchError::Load {
                size,
                guest,
                source,
            })?;
            let need = (args.dirty_mib << 20) + reserve;
            if free < need {
                let min = (size - free + need).next_multiple_of(1 << 20);
                return Err(MigrateBenchError::TooSmall {
                    size,
                    guest,
                    dirty_mib: args.dirty_mib,
                    free,
                    min,
                });
            }
        }
    }
    Ok(())
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    sev: bool,
    dirty_mib: u64,
    populated: bool,
    prealloc: bool,
    stopped: bool,
    postcopy: bool,
}

/// Both ends' TLS for `--transport tls`: test certificates from a scratch directory.
struct BenchTls {
    server: esvm::tls::TlsServer,
    client: esvm::tls::TlsClient,
}

impl BenchTls {
    fn new() -> Result<Self, Box<dyn Error>> {
        let dir = std::env::temp_dir().join(format!("esvm-bench-tls-{}", std::process::id()));
        let made = esvm_tls::certs::make(
            &dir,
            &["dst,127.0.0.1".into(), "src".into()],
            esvm_tls::Validity::Days(1),
            false,
        );
        let loaded = made.map_err(Box::<dyn Error>::from).and_then(|_| {
            let f = |n: &str| dir.join(n);
            let server =
                esvm::tls::TlsServer::load(&f("dst.pem"), &f("dst-key.pem"), &f("ca.pem"))?;
            let client = esvm::tls::TlsClient::load(
                Some((&f("src.pem"), &f("src-key.pem"))),
                &f("ca.pem"),
                None,
            )?;
            Ok(BenchTls { server, client })
        });
        let _ = std::fs::remove_dir_all(&dir);
        loaded
    }
}

fn one(
    args: &MigrateBenchArgs,
    mem: u64,
    sc: Scenario,
    linux: Option<&LinuxGuest>,
    tls: Option<&BenchTls>,
) -> Result<Row, Box<dyn std::error::Error>> {
    let linux = linux.cloned();
    let Scenario {
        sev,
        dirty_mib,
        populated: fill,
        prealloc,
        stopped,
        postcopy,
    } = sc;
    let (src_platform, dst_platform) = if sev {
        let (a, b) = platforms()?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    let (h, source, up) = start_source(mem, dirty_mib, fill, src_platform, linux.clone())?;
    if linux.is_some() {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !up.load(std::sync::atomic::Ordering::SeqCst) {
            if Instant::now() > deadline || source.is_finished() {
                return Err("the Linux guest did not reach its userland".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let source_mips = guest_mips(&h, Duration::from_millis(args.warmup_ms))?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = tls.map(|t| t.server.clone());
    let dest = std::thread::Builder::new()
        .name("bench-receive".into())
        .spawn(move || -> Result<Received, String> {
            let (s, _) = listener.accept().map_err(|e| e.to_string())?;
            let stream = match &server {
                Some(server) => esvm::tls::accept(server, s.into(), esvm::tls::HANDSHAKE_TIMEOUT)
                    .map_err(|e| e.to_string())?,
                None => s.into(),
            };
            let (tx, rx) = mpsc::channel();
            let mut target = MachineTarget::new(
                BackendKind::Emu,
                Box::new(|| Box::new(std::io::sink()) as Box<dyn std::io::Write + Send>),
            )
            .with_prealloc(prealloc)
            .with_platform(dst_platform)
            .with_postcopy(tx);
            let receiver = std::thread::Builder::new()
                .name("bench-receiver".into())
                .spawn(move || {
                    let r =
                        Receiver::new(ReceiverConfig::default()).run_stream(&mut target, stream);
                    target.end_handoff();
                    (r.map_err(|e| e.to_string()), target)
                })
                .map_err(|e| e.to_string())?;
            let Ok(start) = rx.recv() else {
                let (r, target) = receiver.join().map_err(|_| "receiver panicked")?;
                r?;
                let m = target
                    .into_machine()
                    .ok_or_else(|| "no machine after the commit".to_string())?;
                return Ok((m, None));
            };
            // Post-copy: the guest runs here while its pages arrive; once all arrived, stop
            // it (the benchmark's guest never ends by itself).
            let mut m = start.machine;
            let control = m.control().clone();
            let runner = std::thread::Builder::new()
                .name("bench-dest-vcpu".into())
                .spawn(move || {
                    let o = m.run();
                    (o, m)
                })
                .map_err(|e| e.to_string())?;
            let (r, _target) = receiver.join().map_err(|_| "receiver panicked")?;
            let stats = start.missing.stats();
            let _ = control.request_stop(Outcome::Stopped("by the benchmark".into()));
            let (o, m) = runner.join().map_err(|_| "destination vCPU panicked")?;
            r?;
            o.map_err(|e| e.to_string())?;
            Ok((m, Some(stats)))
        })?;
    let url = format!("tcp://{addr}");
    // The guest stays stopped for the whole migration (the transport alone is measured).
    let held = if stopped {
        Some(h.control.stop(esvm::runctl::PARK_TIMEOUT)?)
    } else {
        None
    };
    let mut src = MachineSource::new(h.clone(), url)?;
    let mut sender = Sender::new(SenderConfig {
        downtime_limit: Duration::from_millis(args.downtime_ms),
        max_bandwidth: args.max_bandwidth.filter(|&b| b > 0),
        max_passes: args.max_passes.max(1),
        on_limit: esvm_migration::LimitPolicy::Force,
        postcopy_after: postcopy.then_some(args.postcopy_after),
        ..SenderConfig::default()
    });
    let out: SendOutcome = match tls {
        // The handshake is part of the migration (its total time), as in `ctl migrate`.
        Some(t) => {
            let dest_url = esvm::transport::MigrationUrl::Tcp(addr.to_string());
            let stream = esvm::tls::connect(&dest_url, Some(&t.client), &|| false)?;
            sender.run_stream(&mut src, stream)?
        }
        None => sender.run_tcp(&mut src, TcpStream::connect(addr)?)?,
    };
    let (mut received, faults) = dest
        .join()
        .map_err(|_| "the destination thread panicked")??;
    let (outcome, mut source_machine) =
        source.join().map_err(|_| "the source thread panicked")??;
    drop((src, held, h));
    if !matches!(outcome, Outcome::Migrated(_)) {
        return Err(format!("the source ended with {outcome:?} instead of migrating").into());
    }
    // The source is frozen where it stopped: the destination must hold the same memory
    // (plain guests; an SEV-ES guest's memory is ciphertext under different keys on the two
    // hosts — the tests check that the guest continues exactly).
    let (a, b) = (source_machine.vm().memory(), received.vm().memory());
    // After post-copy the destination's guest ran on: nothing to compare.
    let compare_to = if sev || postcopy { 0 } else { mem };
    let mut x = vec![0u8; 4 << 20];
    let mut y = vec![0u8; 4 << 20];
    let mut addr = 0;
    while addr < compare_to {
        let n = (mem - addr).min(x.len() as u64) as usize;
        a.read(addr, &mut x[..n])?;
        b.read(addr, &mut y[..n])?;
        if x[..n] != y[..n] {
            return Err(format!("destination memory differs near {addr:#x}").into());
        }
        addr += n as u64;
    }
    // Every thread using them is joined: give both guests' memory back now, so that
    // repeated runs do not accumulate it.
    esvm::migrate::release_guest_memory(&mut source_machine)?;
    esvm::migrate::release_guest_memory(&mut received)?;
    Ok(Row {
        sev_es: sev,
        mem_mib: mem >> 20,
        mem_bytes: mem,
        workload: if linux.is_some() {
            "Linux, booted, idle shell".into()
        } else if dirty_mib == 0 {
            "idle".into()
        } else {
            format!("dirty-mib={dirty_mib}")
        },
        populated: fill,
        prealloc,
        stopped,
        passes: out.passes,
        pages_sent: out.pages_sent,
        bytes_sent: out.bytes_sent,
        first_pass_gib_s: out.first_pass_bandwidth / GIB,
        overall_gib_s: out.bytes_sent as f64 / out.total_time.as_secs_f64() / GIB,
        total_ms: out.total_time.as_secs_f64() * 1e3,
        final_pass_pages: out.final_pass_pages,
        estimated_downtime_ms: out.estimated_downtime.map(|d| d.as_secs_f64() * 1e3),
        downtime_ms: out.downtime.as_secs_f64() * 1e3,
        source_mips,
        transport: if tls.is_some() { "tls" } else { "tcp" },
        mode: if postcopy { "post-copy" } else { "pre-copy" },
        max_bandwidth: args.max_bandwidth.filter(|&b| b > 0),
        forced: out.forced,
        switch_ms: out
            .postcopy
            .as_ref()
            .map(|p| p.switch_time.as_secs_f64() * 1e3),
        demand_faults: faults.map(|f| f.demand_faults),
        fault_wait_ms: faults.map(|f| f.wait_ns as f64 / 1e6),
        postcopy_pages: out.postcopy.as_ref().map(|p| p.pages_at_switch),
    })
}

/// The pre-copy / post-copy comparison table.
fn print_modes(rows: &[Row], args: &MigrateBenchArgs) {
    println!(
        "esvm bench migrate --mode {}: demo guest on the emu backend, loopback TCP (TLS where the \
         transport column says so), link cap {}, \
         downtime limit {} ms, pre-copy forced after {} passes, post-copy after {} pass(es), \
         median of {} run(s)",
        args.mode.join(","),
        args.max_bandwidth
            .filter(|&b| b > 0)
            .map_or("none".to_string(), |b| format!("{}/s", format_size(b))),
        args.downtime_ms,
        args.max_passes,
        args.postcopy_after,
        args.repeat.max(1)
    );
    println!(
        "| guest | workload | mode | sent | passes | time to switch ms | downtime ms | total ms \
         | pages after switch | demand faults | fault wait ms | transport |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.0}"));
    for r in rows {
        println!(
            "| {}{} | {} | {}{} | {:.1} MiB | {} | {} | {:.1} | {:.0} | {} | {} | {} | {} |",
            if r.sev_es { "SEV-ES " } else { "" },
            format_size(r.mem_bytes),
            r.workload,
            r.mode,
            if r.forced { " (forced)" } else { "" },
            r.bytes_sent as f64 / (1u64 << 20) as f64,
            r.passes,
            // Pre-copy "switches" when the guest resumes at the destination: at the end.
            opt(r.switch_ms.or(Some(r.total_ms))),
            r.downtime_ms,
            r.total_ms,
            r.postcopy_pages
                .map_or_else(|| "-".to_string(), |p| p.to_string()),
            r.demand_faults
                .map_or_else(|| "-".to_string(), |p| p.to_string()),
            opt(r.fault_wait_ms),
            r.transport,
        );
    }
}

/// How fast this machine hands out fresh memory: fault in 256 MiB of new anonymous
/// memory (GiB/s). A cold migration destination cannot take pages in faster.
fn fault_in_rate() -> Result<f64, Box<dyn std::error::Error>> {
    let mem = esvm_hv::GuestMemory::new(256 << 20)?;
    let t = Instant::now();
    let mut addr = 0;
    while addr < mem.size() {
        // One byte per page: the kernel allocates and zeroes the page.
        mem.write(addr, &[1])?;
        addr += 4096;
    }
    Ok(0.25 / t.elapsed().as_secs_f64())
}

pub fn run(args: &MigrateBenchArgs, json: bool) -> Result<u8, Box<dyn std::error::Error>> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| MigrateBenchError::Read {
            path: path.clone(),
            source,
        })
    };
    let linux = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => Some(LinuxGuest {
            kernel: Arc::new(read(k)?),
            initrd: Arc::new(read(i)?),
        }),
        _ => None,
    };
    check_sizes(args, linux.as_ref())?;
    let fault_in = fault_in_rate()?;
    let sc = |dirty_mib, populated, prealloc, stopped| Scenario {
        sev: false,
        dirty_mib,
        populated,
        prealloc,
        stopped,
        postcopy: false,
    };
    let scenarios = [
        sc(0, true, true, false),
        sc(args.dirty_mib, true, true, false),
        sc(0, true, false, false),
        sc(0, false, false, false),
        sc(0, true, true, true),
        Scenario {
            sev: true,
            ..sc(0, true, true, false)
        },
        Scenario {
            sev: true,
            ..sc(args.dirty_mib, true, true, false)
        },
        Scenario {
            sev: true,
            ..sc(0, true, true, true)
        },
    ];
    // A Linux guest: its own memory as it booted (not populated), to a preallocated
    // destination, while it runs.
    let linux_scenarios = [
        sc(0, false, true, false),
        Scenario {
            sev: true,
            ..sc(0, false, true, false)
        },
    ];
    let scenarios: Vec<Scenario> = if args.mode.iter().any(|m| m == "postcopy") {
        // The modes side by side on the dirtying workload (post-copy's case).
        let base = if linux.is_some() {
            sc(0, false, true, false)
        } else {
            sc(args.dirty_mib, true, true, false)
        };
        let mut v = Vec::new();
        for sev in [false, true] {
            for postcopy in [false, true] {
                let mode = if postcopy { "postcopy" } else { "precopy" };
                if args.mode.iter().any(|m| m == mode) {
                    v.push(Scenario {
                        sev,
                        postcopy,
                        ..base
                    });
                }
            }
        }
        v
    } else if linux.is_some() {
        linux_scenarios.to_vec()
    } else {
        scenarios.to_vec()
    };
    let wanted = |sc: &Scenario| args.guests.iter().any(|g| (g == "sev-es") == sc.sev);
    let want_tls = args.transport.iter().any(|t| t == "tls");
    let bench_tls = if want_tls {
        Some(BenchTls::new()?)
    } else {
        None
    };
    let aes_gcm = if want_tls {
        Some(esvm_tls::aes_128_gcm_rate(256 << 20) / GIB)
    } else {
        None
    };
    let mut transports: Vec<Option<&BenchTls>> = Vec::new();
    if args.transport.iter().any(|t| t == "tcp") {
        transports.push(None);
    }
    if let Some(t) = &bench_tls {
        transports.push(Some(t));
    }
    let mut rows = Vec::new();
    for &mem in &args.sizes {
        for (sc, tls) in scenarios
            .iter()
            .copied()
            .filter(wanted)
            .flat_map(|sc| transports.iter().map(move |&t| (sc, t)))
        {
            let mut runs = Vec::new();
            for _ in 0..args.repeat.max(1) {
                runs.push(one(args, mem, sc, linux.as_ref(), tls)?);
            }
            runs.sort_by(|a, b| a.first_pass_gib_s.total_cmp(&b.first_pass_gib_s));
            let row = runs.swap_remove(runs.len() / 2);
            if !json {
                eprintln!(
                    "{}{}{} {}{} ({}, {} destination): {:.2} GiB/s, downtime {:.2} ms, guest {:.0} MIPS",
                    if tls.is_some() { "[tls] " } else { "" },
                    if sc.sev { "SEV-ES " } else { "" },
                    format_size(row.mem_bytes),
                    row.workload,
                    if sc.stopped { ", guest stopped" } else { "" },
                    if sc.populated { "populated" } else { "fresh" },
                    if sc.prealloc { "preallocated" } else { "cold" },
                    row.first_pass_gib_s,
                    row.downtime_ms,
                    row.source_mips
                );
            }
            rows.push(row);
        }
    }
    if json {
        super::bench::print_json(&MigrateReport {
            guest: if linux.is_some() { "linux" } else { "demo" },
            backend: "emu",
            downtime_limit_ms: args.downtime_ms,
            warmup_ms: args.warmup_ms,
            repeat: args.repeat.max(1),
            fault_in_gib_s: fault_in,
            aes_128_gcm_gib_s: aes_gcm,
            rows,
        })?;
        return Ok(0);
    }
    if args.mode.iter().any(|m| m == "postcopy") {
        print_modes(&rows, args);
        return Ok(0);
    }
    println!(
        "esvm bench migrate: {} on the emu backend, loopback TCP, downtime limit {} \
         ms, median of {} run(s); fresh memory faults in at {fault_in:.2} GiB/s on this machine",
        if linux.is_some() {
            "a booted Linux guest"
        } else {
            "demo guest"
        },
        args.downtime_ms,
        args.repeat.max(1)
    );
    if let Some(a) = aes_gcm {
        println!(
            "AES-128-GCM (ring, one core, 16 KiB records) seals at {a:.2} GiB/s on this machine"
        );
    }
    println!(
        "| guest | workload | source memory | destination | sent | passes | first pass GiB/s | \
         overall GiB/s | final-pass pages | downtime ms (estimate) | total ms | guest MIPS | \
         transport |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {}{} | {} | {} | {} | {:.1} MiB | {} | {:.2} | {:.2} | {} | {:.2} ({}) | {:.0} | {:.0} | {} |",
            if r.sev_es { "SEV-ES " } else { "" },
            format_size(r.mem_bytes),
            if r.stopped {
                format!("{} (guest stopped)", r.workload)
            } else {
                r.workload.clone()
            },
            if r.populated {
                "populated"
            } else {
                "fresh"
            },
            if r.prealloc { "preallocated" } else { "cold" },
            r.bytes_sent as f64 / (1u64 << 20) as f64,
            r.passes,
            r.first_pass_gib_s,
            r.overall_gib_s,
            r.final_pass_pages,
            r.downtime_ms,
            r.estimated_downtime_ms
                .map(|e| format!("{e:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.total_ms,
            r.source_mips,
            r.transport
        );
    }
    Ok(0)
}
