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
    /// Several vCPUs: Linux booting with 1, 2 and 4 vCPUs in parallel (a host thread each)
    /// and with --deterministic (one-thread turns), and the multithreaded mtload workload's
    /// guest instructions per second, beside the native mtload on the host (1 and N
    /// threads) in the same run. `scripts/linux-assets.sh` builds the inputs.
    Smp(super::bench_smp::SmpBenchArgs),
}

#[derive(Args, Debug)]
pub struct IoBenchArgs {
    /// Port writes per measurement (at least 1).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
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
    /// Guest memory moved per round, e.g. 256M (a bare number means MiB); at least 16M
    /// (smaller buffers time thread start-up and scheduler noise, not the crypto) and a
    /// whole number of packets.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    pub buffer: u64,
    /// Size of a transport packet (one SEND_UPDATE_DATA call), e.g. 4K or 4096B (a bare
    /// number means MiB, as for every size).
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
    /// Loop iterations per measurement (each loop retires 8 or 10 instructions per
    /// iteration); any number from 1, the instruction counts are exact.
    #[arg(long, default_value_t = 20_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: u64,
    /// Repetitions per loop and backend; the best (fastest) is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Skip the KVM column.
    #[arg(long)]
    pub no_kvm: bool,
}

/// Marker values the cpubench guest writes to port 0xF5 around its loop.
const MARK_START: u32 = esvm_abi::boot::BENCH_MARKER_START;
const MARK_END: u32 = esvm_abi::boot::BENCH_MARKER_END;

/// Smallest `bench psp --buffer` that measures the crypto. A 4 KiB buffer is timed in
/// microseconds, the cost of starting the worker threads; a 1 MiB one in about 2 ms, less
/// than a scheduler time slice, so on a busy machine one preemption decides a figure and the
/// firmware and the raw limit, timed apart, come out in either order (ratios like 124% or
/// 200% of the raw limit). From 16 MiB (tens of ms per timing) the ratios were stable
/// below 100% even with the 2-core test machine at a load average of 8.
pub const MIN_PSP_BUFFER: u64 = 16 << 20;

/// Why a benchmark was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(
        "the {guest} guest did not write both benchmark markers (0x{start:08X} and 0x{end:08X})"
    )]
    MissingMarkers {
        guest: &'static str,
        start: u32,
        end: u32,
    },
    #[error("--buffer {} is too small to measure: give at least {} (smaller buffers are timed in microseconds to a few milliseconds, where thread start-up and a single preemption decide the figures, not the crypto)", format_size(*.0), format_size(MIN_PSP_BUFFER))]
    PspBufferTooSmall(u64),
    #[error("--buffer {} is not a whole number of --packet {packet} B packets: give a multiple of the packet size", format_size(*.buffer))]
    PspBufferNotPackets { buffer: u64, packet: u64 },
    #[error("--packet must be at least 1 byte")]
    PspPacketZero,
    #[error(transparent)]
    Output(#[from] super::output::OutputError),
}

use esvm::size::format_size;

use super::output::Format;

/// One loop of `bench cpu`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CpuRow {
    #[serde(rename = "loop")]
    pub loop_name: String,
    pub insns_per_iter: u64,
    /// The loop's own instructions: iterations x instructions per iteration.
    pub instructions: u64,
    /// Instructions the interpreter retired between the markers (exact, from virtual time):
    /// the loop's plus its call, return and marker writes.
    pub emu_instructions: u64,
    pub native_mips: f64,
    pub emu_mips: f64,
    pub kvm_mips: Option<f64>,
    /// emu MIPS as a percentage of native MIPS.
    pub emu_native_percent: f64,
}

/// What `bench cpu` prints.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CpuReport {
    pub iterations: u64,
    /// Repetitions per loop and backend; each figure is the best.
    pub repeat: u32,
    pub loops: Vec<CpuRow>,
    /// Why there is no KVM column, if there is none.
    pub kvm_skipped: Option<String>,
}

/// Print `report` as one JSON document on stdout (`esvm --json bench ...`).
pub(crate) fn print_json(report: &impl serde::Serialize) -> Result<(), BenchError> {
    Ok(Format::Json.emit(report, |_| String::new())?)
}

/// Runs `esvm bench`; with `format` JSON each bench prints its figures as one JSON document
/// instead of tables.
pub fn run(cmd: BenchCommand, format: Format) -> Result<u8, Box<dyn std::error::Error>> {
    let json = format.is_json();
    match cmd {
        BenchCommand::Cpu(args) => bench_cpu(&args, json),
        BenchCommand::Psp(args) => bench_psp(&args, json),
        BenchCommand::Io(args) => bench_io(&args, json),
        BenchCommand::Migrate(args) => super::bench_migrate::run(&args, json),
        BenchCommand::Linux(args) => super::bench_linux::run(&args, json),
        BenchCommand::Smp(args) => super::bench_smp::run(&args, json),
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
    Ok(marker_interval(&m, "cpubench", MARK_START, MARK_END)?)
}

/// Host seconds and virtual nanoseconds between a guest's two benchmark markers (port 0xF5),
/// from the last mark of each value: a guest may repeat a marker so that the repetition
/// carries the exact virtual time of the first write (see the cpubench guest).
fn marker_interval(
    m: &Machine,
    guest: &'static str,
    start: u32,
    end: u32,
) -> Result<(f64, u64), BenchError> {
    interval(m.devices().bench_marks(), guest, start, end)
}

fn interval(
    marks: &[esvm_devices::BenchMark],
    guest: &'static str,
    start: u32,
    end: u32,
) -> Result<(f64, u64), BenchError> {
    let s = marks.iter().rfind(|k| k.value == start);
    let e = marks.iter().rfind(|k| k.value == end);
    match (s, e) {
        (Some(s), Some(e)) if e.virtual_ns >= s.virtual_ns => Ok((
            e.host.duration_since(s.host).as_secs_f64(),
            e.virtual_ns - s.virtual_ns,
        )),
        _ => Err(BenchError::MissingMarkers { guest, start, end }),
    }
}

fn bench_cpu(args: &CpuBenchArgs, json: bool) -> Result<u8, Box<dyn std::error::Error>> {
    let kvm_ok = if args.no_kvm {
        Err("disabled with --no-kvm".to_string())
    } else {
        esvm_hv::open(BackendKind::Kvm)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let n = args.iterations;
    let repeat = args.repeat.max(1);
    let mut loops = Vec::new();
    for which in BenchLoop::ALL {
        let instructions = n * which.insns_per_iter();
        let mut native = f64::MAX;
        let mut emu = f64::MAX;
        let mut emu_insns = 0;
        let mut kvm: Option<f64> = None;
        for _ in 0..repeat {
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
        let native_mips = mips(instructions, native);
        let emu_mips = mips(emu_insns, emu);
        loops.push(CpuRow {
            loop_name: which.name().to_string(),
            insns_per_iter: which.insns_per_iter(),
            instructions,
            emu_instructions: emu_insns,
            native_mips,
            emu_mips,
            kvm_mips: kvm.map(|k| mips(instructions, k)),
            emu_native_percent: 100.0 * emu_mips / native_mips,
        });
    }
    let report = CpuReport {
        iterations: n,
        repeat,
        loops,
        kvm_skipped: kvm_ok.err(),
    };
    if json {
        print_json(&report)?;
    } else {
        print!("{}", cpu_text(&report));
    }
    Ok(0)
}

fn cpu_text(r: &CpuReport) -> String {
    let mut out = format!(
        "esvm bench cpu: {} iterations per loop, best of {}\n",
        r.iterations, r.repeat
    );
    out += &format!(
        "{:<8} {:>10} {:>14} {:>14} {:>14} {:>16} {:>10}\n",
        "loop",
        "insns/iter",
        "instructions",
        "native MIPS",
        "emu MIPS",
        "kvm ring-3 MIPS",
        "emu/native"
    );
    for l in &r.loops {
        out += &format!(
            "{:<8} {:>10} {:>14} {:>14.0} {:>14.1} {:>16} {:>9.1}%\n",
            l.loop_name,
            l.insns_per_iter,
            l.emu_instructions,
            l.native_mips,
            l.emu_mips,
            l.kvm_mips
                .map(|k| format!("{k:.0}"))
                .unwrap_or_else(|| "-".into()),
            l.emu_native_percent
        );
    }
    out += "instructions: retired by the software vCPU between the loop's markers (exact: the \
            loop, its call and return, the marker writes)\n";
    if let Some(reason) = &r.kvm_skipped {
        out += &format!("kvm: skipped: {reason}\n");
    }
    out
}

/// One `bench psp` measurement (one thread count), in GiB/s.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PspRow {
    /// Worker threads of SEND/RECEIVE_UPDATE_DATA and of the raw re-wrap.
    pub threads: usize,
    pub raw_aes_ctr_gib_s: f64,
    pub raw_hmac_sha256_gib_s: f64,
    pub raw_sha256_gib_s: f64,
    /// Per-core limit of a page re-wrap: 1 / (1/AES + 1/HMAC).
    pub rewrap_limit_gib_s: f64,
    /// AES-128-CTR then HMAC-SHA256 per packet on `threads` threads, no firmware.
    pub raw_rewrap_gib_s: f64,
    pub launch_update_data_gib_s: f64,
    pub send_update_data_gib_s: f64,
    pub receive_update_data_gib_s: f64,
    /// LAUNCH_UPDATE_DATA as a percentage of raw SHA-256.
    pub launch_percent_of_sha256: f64,
    /// SEND_UPDATE_DATA as a percentage of the raw re-wrap on as many threads.
    pub send_percent_of_raw_rewrap: f64,
    /// RECEIVE_UPDATE_DATA as a percentage of the raw re-wrap on as many threads.
    pub receive_percent_of_raw_rewrap: f64,
}

/// What `bench psp` prints.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PspReport {
    pub buffer_bytes: u64,
    pub packet_bytes: u64,
    /// Rounds per measurement; each figure is the best.
    pub rounds: usize,
    pub rows: Vec<PspRow>,
}

/// Refuse `bench psp` sizes that cannot give a meaningful figure.
fn check_psp_sizes(buffer: u64, packet: u64) -> Result<(), BenchError> {
    if packet == 0 {
        return Err(BenchError::PspPacketZero);
    }
    if buffer < MIN_PSP_BUFFER {
        return Err(BenchError::PspBufferTooSmall(buffer));
    }
    if !buffer.is_multiple_of(packet) {
        return Err(BenchError::PspBufferNotPackets { buffer, packet });
    }
    Ok(())
}

fn bench_psp(args: &PspBenchArgs, json: bool) -> Result<u8, Box<dyn std::error::Error>> {
    check_psp_sizes(args.buffer, args.packet)?;
    let mut threads = vec![1];
    if args.threads > 1 {
        threads.push(args.threads);
    }
    let rounds = args.rounds.max(1);
    let mut rows = Vec::new();
    for t in threads {
        let f = esvm_psp::bench::run(esvm_psp::bench::BenchConfig {
            buffer_bytes: usize::try_from(args.buffer)?,
            packet_bytes: usize::try_from(args.packet)?,
            threads: t,
            rounds,
        })?;
        rows.push(PspRow {
            threads: t,
            raw_aes_ctr_gib_s: f.raw_aes_ctr,
            raw_hmac_sha256_gib_s: f.raw_hmac_sha256,
            raw_sha256_gib_s: f.raw_sha256,
            rewrap_limit_gib_s: f.rewrap_limit,
            raw_rewrap_gib_s: f.raw_rewrap_threads,
            launch_update_data_gib_s: f.launch_update_data,
            send_update_data_gib_s: f.send_update_data,
            receive_update_data_gib_s: f.receive_update_data,
            launch_percent_of_sha256: 100.0 * f.launch_efficiency(),
            send_percent_of_raw_rewrap: 100.0 * f.send_efficiency(),
            receive_percent_of_raw_rewrap: 100.0 * f.receive_efficiency(),
        });
        if !json {
            print!(
                "{}",
                psp_text(
                    args.buffer,
                    args.packet,
                    rounds,
                    rows.last().expect("pushed")
                )
            );
        }
    }
    if json {
        print_json(&PspReport {
            buffer_bytes: args.buffer,
            packet_bytes: args.packet,
            rounds,
            rows,
        })?;
    }
    Ok(0)
}

fn psp_text(buffer: u64, packet: u64, rounds: usize, r: &PspRow) -> String {
    let t = r.threads;
    let mut out = format!(
        "buffer {}, packets {}, {t} thread(s), best of {rounds} round(s)\n",
        format_size(buffer),
        format_size(packet)
    );
    for (name, v) in [
        ("raw AES-128-CTR (1 core)", r.raw_aes_ctr_gib_s),
        ("raw HMAC-SHA256 (1 core)", r.raw_hmac_sha256_gib_s),
        ("raw SHA-256 (1 core)", r.raw_sha256_gib_s),
        ("re-wrap limit (1 core)", r.rewrap_limit_gib_s),
        (&format!("raw re-wrap x{t} (measured)"), r.raw_rewrap_gib_s),
    ] {
        out += &format!("{name:<30}{v:7.2} GiB/s\n");
    }
    out += &format!(
        "{:<30}{:7.2} GiB/s  ({:.0}% of SHA-256)\n",
        "LAUNCH_UPDATE_DATA", r.launch_update_data_gib_s, r.launch_percent_of_sha256
    );
    for (name, v, pct) in [
        (
            "SEND_UPDATE_DATA",
            r.send_update_data_gib_s,
            r.send_percent_of_raw_rewrap,
        ),
        (
            "RECEIVE_UPDATE_DATA",
            r.receive_update_data_gib_s,
            r.receive_percent_of_raw_rewrap,
        ),
    ] {
        out += &format!(
            "{:<30}{v:7.2} GiB/s  ({pct:.0}% of raw re-wrap x{t})\n",
            format!("{name:<19} x{t}")
        );
    }
    if [
        r.launch_percent_of_sha256,
        r.send_percent_of_raw_rewrap,
        r.receive_percent_of_raw_rewrap,
    ]
    .iter()
    .any(|&p| p > 100.0)
    {
        out += "note: a figure above 100% of its raw limit is measurement noise (other load on \
                the machine, or rounds too short): give more --rounds or a larger --buffer\n";
    }
    out
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

/// One path of `bench io`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IoRow {
    pub path: String,
    pub round_trips_per_s: f64,
    pub us_each: f64,
}

/// What `bench io` prints.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IoReport {
    pub writes: u64,
    /// Repetitions; each figure is the best.
    pub repeat: u32,
    pub paths: Vec<IoRow>,
}

fn bench_io(args: &IoBenchArgs, json: bool) -> Result<u8, Box<dyn std::error::Error>> {
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
    let repeat = args.repeat.max(1);
    let mut plain = f64::MAX;
    let mut sev = f64::MAX;
    for _ in 0..repeat {
        plain = plain.min(io_round_trips(n, None)?);
        sev = sev.min(io_round_trips(n, Some(&platform))?);
    }
    if args.platform.is_none() {
        let _ = std::fs::remove_dir_all(&platform);
    }
    let report = IoReport {
        writes: n,
        repeat,
        paths: [
            ("plain OUT exit (emu)", plain),
            ("SEV-ES GHCB IOIO VMGEXIT (emu)", sev),
        ]
        .into_iter()
        .map(|(path, secs)| IoRow {
            path: path.to_string(),
            round_trips_per_s: n as f64 / secs,
            us_each: secs * 1e6 / n as f64,
        })
        .collect(),
    };
    if json {
        print_json(&report)?;
        return Ok(0);
    }
    println!("esvm bench io: {n} writes to a null port, best of {repeat}");
    println!("{:<34} {:>14} {:>12}", "path", "round trips/s", "us each");
    for r in &report.paths {
        println!(
            "{:<34} {:>14.0} {:>12.3}",
            r.path, r.round_trips_per_s, r.us_each
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mark(value: u32, virtual_ns: u64, host: Instant) -> esvm_devices::BenchMark {
        esvm_devices::BenchMark {
            value,
            virtual_ns,
            host,
        }
    }

    #[test]
    fn marker_interval_takes_the_last_mark_of_each_value() {
        let t = Instant::now();
        let marks = [
            mark(MARK_START, 10, t),
            mark(MARK_START, 16, t),
            mark(MARK_END, 16, t + Duration::from_millis(5)),
            mark(MARK_END, 2_000_032, t + Duration::from_millis(7)),
        ];
        let (secs, insns) = interval(&marks, "cpubench", MARK_START, MARK_END).unwrap();
        assert_eq!(insns, 2_000_016);
        assert!((secs - 0.007).abs() < 1e-9, "{secs}");
        assert!(matches!(
            interval(&marks[..2], "cpubench", MARK_START, MARK_END),
            Err(BenchError::MissingMarkers { .. })
        ));
    }

    #[test]
    fn psp_sizes_too_small_or_not_whole_packets_are_refused() {
        assert!(check_psp_sizes(256 << 20, 4096).is_ok());
        assert!(check_psp_sizes(MIN_PSP_BUFFER, 4096).is_ok());
        let e = check_psp_sizes(1024, 4096).unwrap_err();
        assert!(matches!(e, BenchError::PspBufferTooSmall(1024)));
        assert!(e.to_string().contains("--buffer 1 KiB is too small"), "{e}");
        assert!(e.to_string().contains("at least 16 MiB"), "{e}");
        let e = check_psp_sizes(16 << 20, 3000).unwrap_err();
        assert!(e.to_string().contains("--packet 3000 B"), "{e}");
        assert!(matches!(
            check_psp_sizes(16 << 20, 0),
            Err(BenchError::PspPacketZero)
        ));
    }

    fn psp_row(send: f64) -> PspRow {
        PspRow {
            threads: 2,
            raw_aes_ctr_gib_s: 1.0,
            raw_hmac_sha256_gib_s: 2.0,
            raw_sha256_gib_s: 2.0,
            rewrap_limit_gib_s: 0.67,
            raw_rewrap_gib_s: 1.2,
            launch_update_data_gib_s: 1.8,
            send_update_data_gib_s: send,
            receive_update_data_gib_s: 1.0,
            launch_percent_of_sha256: 90.0,
            send_percent_of_raw_rewrap: 100.0 * send / 1.2,
            receive_percent_of_raw_rewrap: 83.3,
        }
    }

    #[test]
    fn psp_text_shows_format_sizes_and_flags_ratios_above_the_limit() {
        let t = psp_text(1 << 30, 4096, 3, &psp_row(1.08));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "buffer 1 GiB, packets 4 KiB, 2 thread(s), best of 3 round(s)"
        );
        assert_eq!(
            lines[7],
            "SEND_UPDATE_DATA    x2           1.08 GiB/s  (90% of raw re-wrap x2)"
        );
        assert_eq!(lines.len(), 9, "{t}");
        assert!(!t.contains("note:"));
        let t = psp_text(16 << 20, 4096, 1, &psp_row(1.5));
        assert!(t.starts_with("buffer 16 MiB,"), "{t}");
        assert!(t.contains("(125% of raw re-wrap x2)"), "{t}");
        assert!(t.contains("note: a figure above 100%"), "{t}");
    }
}
