//! `esvm bench`: performance measurements whose figures go into BENCHMARKS.md.

use std::time::Instant;

use clap::{Args, Subcommand};
use esvm_guests::bench::BenchLoop;
use esvm_hv::BackendKind;

use esvm::machine::{Machine, MachineConfig};
use esvm::outcome::Outcome;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Interpreter speed: the cpubench guest's three loops (register ALU, memory load/store,
    /// call/branch) on the software vCPU, beside the same machine code run natively in this
    /// process (ring 3) and, where /dev/kvm works, under KVM in guest ring 3 — one run.
    Cpu(CpuBenchArgs),
    /// Secure-processor throughput: LAUNCH_UPDATE_DATA and SEND/RECEIVE_UPDATE_DATA in GiB/s
    /// beside the raw AES-128-CTR / HMAC-SHA256 / SHA-256 limits of the same crates on the
    /// same buffers, on one and on several threads.
    Psp(PspBenchArgs),
    /// Live migration of real guests (the demo guest on the software vCPU) between a source
    /// and a destination machine in this process over loopback TCP: throughput and downtime
    /// for each guest size, idle and dirtying memory, plain guests.
    Migrate(super::bench_migrate::MigrateBenchArgs),
    /// Exit round trips: the iobench guest's writes to a null port as plain OUT exits and as
    /// SEV-ES GHCB IOIO requests (one VMGEXIT each), on the software vCPU, in one run.
    Io(IoBenchArgs),
    /// Linux boot: Debian's kernel to a userland workload and its reboot on the software
    /// vCPU (wall time and guest instructions per phase) beside QEMU's TCG booting the same
    /// kernel, initrd and command line in the same run. `scripts/bench-linux.sh` fetches the
    /// inputs and QEMU and runs it.
    Linux(super::bench_linux::LinuxBenchArgs),
}

#[derive(Args, Debug)]
pub struct IoBenchArgs {
    /// Port writes per measurement.
    #[arg(long, default_value_t = 200_000)]
    pub writes: u64,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Platform directory for the SEV-ES run (default: a temporary one).
    #[arg(long, value_name = "DIR")]
    pub platform: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct PspBenchArgs {
    /// Guest memory moved per round, e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    pub buffer: u64,
    /// Bytes per transport packet (one SEND_UPDATE_DATA call).
    #[arg(long, default_value = "4K", value_parser = parse_bytes)]
    pub packet: u64,
    /// Worker threads for SEND/RECEIVE (also reported: 1 thread).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Rounds per measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    esvm::size::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct CpuBenchArgs {
    /// Loop iterations per measurement (each loop retires a few instructions per iteration).
    #[arg(long, default_value_t = 20_000_000)]
    pub iterations: u64,
    /// Repetitions per loop and backend; the best (fastest) is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Skip the KVM column.
    #[arg(long)]
    pub no_kvm: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Marker values the cpubench guest writes to port 0xF5 around its loop.
const MARK_START: u32 = 0xE5B0_0001;
const MARK_END: u32 = 0xE5B0_0002;

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    loop_name: &'static str,
    insns_per_iter: u64,
    instructions: u64,
    native_mips: f64,
    emu_mips: f64,
    /// Instructions the interpreter retired between the markers (exact, from virtual time).
    emu_instructions: u64,
    kvm_mips: Option<f64>,
}

pub fn run(cmd: BenchCommand) -> Result<u8, Box<dyn std::error::Error>> {
    match cmd {
        BenchCommand::Cpu(args) => bench_cpu(&args),
        BenchCommand::Psp(args) => bench_psp(&args),
        BenchCommand::Io(args) => bench_io(&args),
        BenchCommand::Migrate(args) => super::bench_migrate::run(&args),
        BenchCommand::Linux(args) => super::bench_linux::run(&args),
    }
}

fn mips(instructions: u64, seconds: f64) -> f64 {
    instructions as f64 / seconds / 1e6
}

/// Time the guest's loop between its two markers; returns (host seconds, virtual ns).
fn guest_loop(
    backend: BackendKind,
    which: BenchLoop,
    n: u64,
    ring: u8,
) -> Result<(f64, u64), Box<dyn std::error::Error>> {
    let guest = esvm_guests::builtin("cpubench").ok_or("the cpubench guest is missing")?;
    let config = MachineConfig {
        backend,
        vm_type: esvm_hv::VmType::Plain,
        mem_size: 64 << 20,
        vcpus: 1,
        max_instructions: None,
    };
    let mut m = Machine::new(&config, Box::new(std::io::sink()))?;
    m.load(
        guest.elf,
        &format!("loop={} n={n} ring={ring}", which.name()),
    )?;
    match m.run()? {
        Outcome::Exited(0) => {}
        other => return Err(format!("cpubench guest on {backend} ended with {other:?}").into()),
    }
    marker_interval(&m, "cpubench", MARK_START, MARK_END)
}

/// Host seconds and virtual nanoseconds between a guest's two benchmark markers (port 0xF5).
fn marker_interval(
    m: &Machine,
    guest: &str,
    start: u32,
    end: u32,
) -> Result<(f64, u64), Box<dyn std::error::Error>> {
    let marks = m.devices().bench_marks();
    let s = marks.iter().find(|k| k.value == start);
    let e = marks.iter().find(|k| k.value == end);
    match (s, e) {
        (Some(s), Some(e)) => Ok((
            e.host.duration_since(s.host).as_secs_f64(),
            e.virtual_ns - s.virtual_ns,
        )),
        _ => Err(format!("the {guest} guest did not write both benchmark markers").into()),
    }
}

fn bench_cpu(args: &CpuBenchArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let kvm_ok = if args.no_kvm {
        Err("disabled with --no-kvm".to_string())
    } else {
        esvm_hv::open(BackendKind::Kvm)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let n = args.iterations;
    let mut rows = Vec::new();
    for which in BenchLoop::ALL {
        let instructions = n * which.insns_per_iter();
        let mut native = f64::MAX;
        let mut emu = f64::MAX;
        let mut emu_insns = 0;
        let mut kvm: Option<f64> = None;
        for _ in 0..args.repeat.max(1) {
            let t = Instant::now();
            std::hint::black_box(which.run_native(std::hint::black_box(n)));
            native = native.min(t.elapsed().as_secs_f64());
            let (secs, virt) = guest_loop(BackendKind::Emu, which, n, 0)?;
            emu = emu.min(secs);
            emu_insns = virt;
            if kvm_ok.is_ok() {
                let (secs, _) = guest_loop(BackendKind::Kvm, which, n, 3)?;
                kvm = Some(kvm.map_or(secs, |k: f64| k.min(secs)));
            }
        }
        rows.push(Row {
            loop_name: which.name(),
            insns_per_iter: which.insns_per_iter(),
            instructions,
            native_mips: mips(instructions, native),
            emu_mips: mips(emu_insns, emu),
            emu_instructions: emu_insns,
            kvm_mips: kvm.map(|k| mips(instructions, k)),
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "esvm bench cpu: {n} iterations per loop, best of {}",
        args.repeat.max(1)
    );
    println!(
        "{:<8} {:>10} {:>14} {:>14} {:>14} {:>16} {:>10}",
        "loop",
        "insns/iter",
        "instructions",
        "native MIPS",
        "emu MIPS",
        "kvm ring-3 MIPS",
        "emu/native"
    );
    for r in &rows {
        println!(
            "{:<8} {:>10} {:>14} {:>14.0} {:>14.1} {:>16} {:>9.1}%",
            r.loop_name,
            r.insns_per_iter,
            r.emu_instructions,
            r.native_mips,
            r.emu_mips,
            r.kvm_mips
                .map(|k| format!("{k:.0}"))
                .unwrap_or_else(|| "-".into()),
            100.0 * r.emu_mips / r.native_mips
        );
    }
    if let Err(reason) = kvm_ok {
        println!("kvm: skipped: {reason}");
    }
    Ok(0)
}

fn bench_psp(args: &PspBenchArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let mut threads = vec![1];
    if args.threads > 1 {
        threads.push(args.threads);
    }
    for t in threads {
        let figures = esvm_psp::bench::run(esvm_psp::bench::BenchConfig {
            buffer_bytes: args.buffer as usize,
            packet_bytes: args.packet as usize,
            threads: t,
            rounds: args.rounds.max(1),
        })?;
        println!("{figures}");
    }
    Ok(0)
}

const IO_MARK_START: u32 = 0xE5B0_0011;
const IO_MARK_END: u32 = 0xE5B0_0012;

/// Seconds between the iobench guest's markers, plain or SEV-ES.
fn io_round_trips(
    n: u64,
    sev_platform: Option<&std::path::Path>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let guest = esvm_guests::builtin("iobench").ok_or("the iobench guest is missing")?;
    let config = MachineConfig {
        backend: BackendKind::Emu,
        vm_type: if sev_platform.is_some() {
            esvm_hv::VmType::SevEs
        } else {
            esvm_hv::VmType::Plain
        },
        mem_size: 64 << 20,
        vcpus: 1,
        max_instructions: None,
    };
    let mut m = Machine::new(&config, Box::new(std::io::sink()))?;
    let boot = m.load(guest.elf, &format!("n={n}"))?;
    if let Some(platform) = sev_platform {
        esvm::sev_launch::launch(
            &mut m,
            &esvm::sev_launch::measured_regions(&boot),
            &esvm::sev_launch::SevLaunchArgs {
                platform,
                session: None,
                measurement_out: None,
                secret: None,
                policy: None,
            },
        )?;
    }
    match m.run()? {
        Outcome::Exited(0) => {}
        other => return Err(format!("iobench guest ended with {other:?}").into()),
    }
    Ok(marker_interval(&m, "iobench", IO_MARK_START, IO_MARK_END)?.0)
}

fn bench_io(args: &IoBenchArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let tmp;
    let platform = match &args.platform {
        Some(p) => p.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("esvm-bench-io-{}", std::process::id()));
            let ca = esvm_psp::EmulatedAmdCa::generate(2048)?;
            esvm_psp::Psp::create(&tmp, &ca, Default::default())?;
            tmp.clone()
        }
    };
    let n = args.writes;
    let mut plain = f64::MAX;
    let mut sev = f64::MAX;
    for _ in 0..args.repeat.max(1) {
        plain = plain.min(io_round_trips(n, None)?);
        sev = sev.min(io_round_trips(n, Some(&platform))?);
    }
    if args.platform.is_none() {
        let _ = std::fs::remove_dir_all(&platform);
    }
    println!(
        "esvm bench io: {n} writes to a null port, best of {}",
        args.repeat.max(1)
    );
    println!("{:<34} {:>14} {:>12}", "path", "round trips/s", "us each");
    for (name, secs) in [
        ("plain OUT exit (emu)", plain),
        ("SEV-ES GHCB IOIO VMGEXIT (emu)", sev),
    ] {
        println!(
            "{name:<34} {:>14.0} {:>12.3}",
            n as f64 / secs,
            secs * 1e6 / n as f64
        );
    }
    Ok(0)
}
