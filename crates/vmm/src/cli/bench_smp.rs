//! `esvm bench smp`: several vCPUs in parallel (a host thread each) against the one-thread
//! turns of `--deterministic`, on Linux running the multithreaded mtload workload, beside
//! the native run of the same mtload binary on the host (1 and N threads) in the same run.
//!
//! Each boot is timed from the console: "Run /init as init process" ends the boot (the
//! kernel is about to start userland), "mtload threads=" starts the workload phase and
//! "mtload digest=" ends it. At each marker the guest instructions retired so far are read
//! from the run loop's published count (in parallel mode it is published per slice, so it
//! is exact to within one slice of each vCPU, [`esvm::machine::PARALLEL_SLICE`]).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Args;
use esvm::machine::{Machine, MachineConfig};

use super::bench_linux::MarkerWriter;
use esvm::outcome::Outcome;
use esvm_hv::{BackendKind, VmType};
use esvm_loader::linux::LinuxImage;
use thiserror::Error;

/// The console lines that end the boot, start the workload and end it, in order.
const MARKERS: [&str; 3] = [
    "Run /init as init process",
    "mtload threads=",
    "mtload digest=",
];

#[derive(Args, Debug)]
pub struct SmpBenchArgs {
    /// The kernel (bzImage), e.g. the one `scripts/linux-assets.sh` fetches.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// The initramfs with esvm's init and mtload (`scripts/linux-assets.sh` builds it).
    #[arg(long, value_name = "PATH")]
    pub initrd: PathBuf,
    /// The host build of the same mtload (static; `scripts/linux-assets.sh` leaves it beside
    /// the initramfs), run natively as the reference.
    #[arg(long, value_name = "PATH")]
    pub mtload: PathBuf,
    /// mtload's threads, in the guest and natively.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// mtload's work (64 items per unit).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub scale: u32,
    /// The vCPU counts to boot, each in parallel and with --deterministic (1 vCPU runs the
    /// same either way and is booted once).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub vcpus: Vec<u32>,
    /// Guest RAM of every boot, e.g. 256M (a bare number means MiB).
    #[arg(long, default_value = "256M", value_parser = parse_mem)]
    pub mem: u64,
    /// Longest a single boot may take before it counts as hung (then the bench fails).
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

fn parse_mem(s: &str) -> Result<u64, String> {
    esvm::size::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Debug, Error)]
pub enum SmpBenchError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run the native mtload {path}: {source}")]
    Native {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the native mtload {path} failed ({status}): is it the host build of guests/linux/mtload.c?")]
    NativeFailed { path: PathBuf, status: String },
    #[error(
        "the guest with {vcpus} vCPUs never printed {marker:?}: does the initramfs have \
         mtload (scripts/linux-assets.sh)?"
    )]
    MissingMarker { vcpus: u32, marker: &'static str },
    #[error("the guest with {vcpus} vCPUs ended otherwise than by rebooting: {what}")]
    Ended { vcpus: u32, what: String },
    #[error("the guest with {vcpus} vCPUs printed digest {got}, the native run {native}")]
    Digest {
        vcpus: u32,
        got: String,
        native: String,
    },
    #[error("--vcpus lists 0: every boot needs at least one vCPU")]
    NoVcpus,
}

/// When each marker passed: wall time since the run started, guest instructions by then,
/// and the marker's line.
type Marks = [Option<(Duration, u64, String)>; 3];

/// One boot's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SmpBoot {
    pub vcpus: u32,
    pub deterministic: bool,
    /// Process-side wall time from the run's start to `Run /init`.
    pub boot_s: f64,
    /// Guest instructions by then (all vCPUs).
    pub boot_instructions: u64,
    /// The mtload phase: wall time and guest instructions (all vCPUs).
    pub workload_s: f64,
    pub workload_instructions: u64,
    /// Guest instructions per second in the workload phase.
    pub workload_ips: f64,
    /// The workload's wall time over the native run's with as many threads.
    pub vs_native: f64,
    pub digest: String,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SmpReport {
    pub threads: u32,
    pub scale: u32,
    /// Native mtload wall times (s) with 1 and `threads` threads, the best of five runs each.
    pub native_1_thread_s: f64,
    pub native_threads_s: f64,
    pub boots: Vec<SmpBoot>,
}

/// Native runs of mtload per thread count; the fastest counts (a run this short is easily
/// disturbed by other processes).
const NATIVE_RUNS: usize = 5;

/// Run the native mtload with `threads` threads [`NATIVE_RUNS`] times: the best wall time
/// and the digest line.
fn native(args: &SmpBenchArgs, threads: u32) -> Result<(f64, String), SmpBenchError> {
    let mut best: Option<(f64, String)> = None;
    for _ in 0..NATIVE_RUNS {
        let (wall, digest) = native_once(args, threads)?;
        if best.as_ref().is_none_or(|(b, _)| wall < *b) {
            best = Some((wall, digest));
        }
    }
    Ok(best.expect("NATIVE_RUNS > 0"))
}

/// One native run of mtload with `threads` threads: its wall time and digest line.
fn native_once(args: &SmpBenchArgs, threads: u32) -> Result<(f64, String), SmpBenchError> {
    let start = Instant::now();
    let out = Command::new(&args.mtload)
        .args([threads.to_string(), args.scale.to_string()])
        .output()
        .map_err(|source| SmpBenchError::Native {
            path: args.mtload.clone(),
            source,
        })?;
    let wall = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let digest = text.lines().find(|l| l.starts_with("mtload digest="));
    match (out.status.success(), digest) {
        (true, Some(d)) => Ok((wall, d.trim().to_string())),
        _ => Err(SmpBenchError::NativeFailed {
            path: args.mtload.clone(),
            status: out.status.to_string(),
        }),
    }
}

/// Boot the kernel with `vcpus` vCPUs running mtload, in parallel or deterministic.
fn boot(
    args: &SmpBenchArgs,
    kernel: &[u8],
    initrd: &[u8],
    vcpus: u32,
    deterministic: bool,
) -> Result<(Marks, Duration), Box<dyn std::error::Error>> {
    let control = Arc::new(OnceLock::new());
    let marks = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let writer = MarkerWriter::new(&MARKERS, start, control.clone(), marks.clone());
    let config = MachineConfig {
        backend: BackendKind::Emu,
        vm_type: VmType::Plain,
        mem_size: args.mem,
        vcpus,
        max_instructions: None,
    };
    let mut machine = Machine::new(&config, Box::new(writer))?;
    machine.set_deterministic(deterministic);
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 cryptomgr.notests esvm.run=mtload \
         esvm.threads={} esvm.scale={}",
        args.threads, args.scale
    );
    machine.load_linux(&LinuxImage {
        name: &args.kernel.display().to_string(),
        kernel,
        initrd: Some(initrd),
        cmdline: &cmdline,
    })?;
    let control_of = machine.control().clone();
    let _ = control.set(control_of.clone());
    // A hung boot fails the bench instead of hanging it.
    let timeout = Duration::from_secs(args.timeout_s);
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if control_of.lifecycle().alive().is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = control_of.request_stop(Outcome::Stopped("the bench's timeout".into()));
    });
    let outcome = machine.run()?;
    let end = start.elapsed();
    let _ = watchdog.join();
    if !matches!(outcome, Outcome::Reset(_) | Outcome::PowerOff(_)) {
        return Err(SmpBenchError::Ended {
            vcpus,
            what: outcome.describe(),
        }
        .into());
    }
    let got = marks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut m = Marks::default();
    for (i, marker) in MARKERS.iter().enumerate() {
        let Some((at, n, line)) = got[i].clone() else {
            return Err(SmpBenchError::MissingMarker { vcpus, marker }.into());
        };
        m[i] = Some((at, n.unwrap_or(0), line));
    }
    Ok((m, end))
}

pub fn run(args: &SmpBenchArgs, json: bool) -> Result<u8, Box<dyn std::error::Error>> {
    if args.vcpus.contains(&0) {
        return Err(SmpBenchError::NoVcpus.into());
    }
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| SmpBenchError::Read {
            path: path.clone(),
            source,
        })
    };
    let kernel = read(&args.kernel)?;
    let initrd = read(&args.initrd)?;
    let (native_1, digest_1) = native(args, 1)?;
    let (native_n, digest_n) = native(args, args.threads)?;
    if digest_1 != digest_n {
        return Err(SmpBenchError::NativeFailed {
            path: args.mtload.clone(),
            status: format!("its digest depends on the thread count: {digest_1} vs {digest_n}"),
        }
        .into());
    }
    let mut boots = Vec::new();
    for &vcpus in &args.vcpus {
        let modes: &[bool] = if vcpus == 1 { &[false] } else { &[false, true] };
        for &deterministic in modes {
            let (m, _end) = boot(args, &kernel, &initrd, vcpus, deterministic)?;
            let at = |i: usize| m[i].clone().expect("checked by boot");
            let (boot_t, boot_n, _) = at(0);
            let (w0, n0, _) = at(1);
            let (w1, n1, digest) = at(2);
            if digest != digest_n {
                return Err(SmpBenchError::Digest {
                    vcpus,
                    got: digest,
                    native: digest_n,
                }
                .into());
            }
            let workload_s = (w1 - w0).as_secs_f64();
            let workload_instructions = n1.saturating_sub(n0);
            boots.push(SmpBoot {
                vcpus,
                deterministic,
                boot_s: boot_t.as_secs_f64(),
                boot_instructions: boot_n,
                workload_s,
                workload_instructions,
                workload_ips: workload_instructions as f64 / workload_s.max(1e-9),
                vs_native: workload_s / native_n.max(1e-9),
                digest,
            });
        }
    }
    let report = SmpReport {
        threads: args.threads,
        scale: args.scale,
        native_1_thread_s: native_1,
        native_threads_s: native_n,
        boots,
    };
    if json {
        super::bench::print_json(&report)?;
    } else {
        print!("{}", table(&report));
    }
    Ok(0)
}

/// The report as BENCHMARKS.md tables.
fn table(r: &SmpReport) -> String {
    let mut s = format!(
        "mtload, {} threads, scale {}: native (best of {NATIVE_RUNS}) {:.3} s with 1 thread, \
         {:.3} s with {}\n\n",
        r.threads, r.scale, r.native_1_thread_s, r.native_threads_s, r.threads
    );
    s.push_str(
        "| vCPUs | mode | boot to /init (s) | boot instructions | mtload (s) | mtload \
         instructions | M instructions/s | x native |\n|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for b in &r.boots {
        let mode = match (b.vcpus, b.deterministic) {
            (1, _) => "one vCPU",
            (_, true) => "--deterministic",
            (_, false) => "parallel",
        };
        s.push_str(&format!(
            "| {} | {} | {:.2} | {} | {:.2} | {} | {:.1} | {:.0} |\n",
            b.vcpus,
            mode,
            b.boot_s,
            b.boot_instructions,
            b.workload_s,
            b.workload_instructions,
            b.workload_ips / 1e6,
            b.vs_native
        ));
    }
    s
}
