//! `esvm bench linux`: boot a Linux kernel to a userland workload and its reboot on the
//! software vCPU, beside QEMU's TCG booting the same kernel, initrd and command line in the
//! same run, and with `--sev-es` the same kernel as an SEV-ES guest too.
//!
//! Phases are taken from the console: "Run /init as init process" (the kernel is about to
//! start userland), "workload digest=" (the workload's last line) and the end of the run
//! (the reboot). For esvm each phase has the wall time and the guest instructions retired;
//! QEMU (`-accel tcg -M microvm` with no APIC, as REFERENCE.md's comparison) has wall time
//! only — its TCG does not count instructions without slowing down (-icount). An SEV-ES boot
//! is launched through the software secure processor of `--platform` (its launch is part of
//! its times, and reported on its own) and its VMGEXITs are counted by what they asked for
//! (SVM exit code, or MSR-protocol request).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Args;
use esvm::machine::{Machine, MachineConfig, VmControl};
use esvm::outcome::Outcome;
use esvm::sev_launch::SevLaunchArgs;
use esvm_hv::ghcb::{VmgexitCounts, VmgexitKind};
use esvm_hv::{BackendKind, VmType};
use esvm_loader::linux::LinuxImage;
use thiserror::Error;

/// The console lines that end each phase, in order.
const MARKERS: [&str; 2] = ["Run /init as init process", "workload digest="];
const PHASES: [&str; 3] = [
    "entry to /init",
    "entry to end of workload",
    "entry to reboot",
];

#[derive(Args, Debug)]
pub struct LinuxBenchArgs {
    /// The kernel (bzImage). `scripts/bench-linux.sh` fetches Debian's and passes it.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// The initramfs with esvm's init and workload (`scripts/linux-assets.sh` builds it).
    #[arg(long, value_name = "PATH")]
    pub initrd: PathBuf,
    /// The command line of both runs; it must make the init run the workload and reboot.
    #[arg(
        long,
        default_value = "console=ttyS0 reboot=k panic=-1 cryptomgr.notests esvm.run=workload"
    )]
    pub cmdline: String,
    /// Guest RAM of both runs, e.g. 256M (a bare number means MiB).
    #[arg(long, default_value = "256M", value_parser = parse_mem)]
    pub mem: u64,
    /// Boots per side; the best (fastest to reboot) is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// The QEMU binary for the TCG comparison; `none` skips it.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Longest a single boot may take before it counts as hung.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Also boot the kernel as an SEV-ES guest (launched through the secure processor in
    /// --platform), beside the plain boot, and count its VMGEXITs.
    #[arg(long, requires = "platform")]
    pub sev_es: bool,
    /// Platform directory (`esvm platform init --dir DIR`) of the secure processor.
    #[arg(long, value_name = "DIR", requires = "sev_es")]
    pub platform: Option<PathBuf>,
}

fn parse_mem(s: &str) -> Result<u64, String> {
    esvm::size::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Debug, Error)]
pub enum LinuxBenchError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the esvm boot ended without {0:?} on the console: the kernel or init did not get there (run it with `esvm run --kernel` to see the console)")]
    MissingMarker(&'static str),
    #[error("the esvm boot ended unexpectedly: {0}")]
    Ended(String),
    #[error("the SEV-ES boot needs at least {min} MiB of guest RAM (--mem)")]
    SevMemTooSmall { min: u64 },
    #[error("cannot start {qemu}: {source} (install qemu-system-x86, or pass --qemu none)")]
    QemuStart {
        qemu: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU did not reach {marker:?} within {timeout_s} s (console tail: {tail})")]
    QemuHung {
        marker: &'static str,
        timeout_s: u64,
        tail: String,
    },
}

/// When each phase ended: wall time since entry, and guest instructions (esvm only).
#[derive(Debug, Clone, Default)]
struct Phases {
    at: [Option<(Duration, Option<u64>)>; 3],
}

/// When a console marker passed: wall time since the run started, the guest instructions
/// retired by then (if the machine counts them) and the marker's whole line.
pub(super) type Mark = (Duration, Option<u64>, String);

/// Console sink that notes when each of `markers` passes, in order (shared by the Linux
/// benchmarks).
pub(super) struct MarkerWriter {
    line: Vec<u8>,
    next: usize,
    start: Instant,
    markers: &'static [&'static str],
    control: Arc<OnceLock<Arc<VmControl>>>,
    marks: Arc<Mutex<Vec<Option<Mark>>>>,
}

impl MarkerWriter {
    /// A sink timing from `start`, counting through the control set in `control` once the
    /// machine exists; the marks land in `marks` (one slot per marker).
    pub(super) fn new(
        markers: &'static [&'static str],
        start: Instant,
        control: Arc<OnceLock<Arc<VmControl>>>,
        marks: Arc<Mutex<Vec<Option<Mark>>>>,
    ) -> Self {
        marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resize(markers.len(), None);
        MarkerWriter {
            line: Vec::new(),
            next: 0,
            start,
            markers,
            control,
            marks,
        }
    }
}

impl Write for MarkerWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if let Some(marker) = self.markers.get(self.next) {
                let line = String::from_utf8_lossy(&self.line);
                if line.contains(marker) {
                    let n = self.control.get().map(|c| c.instructions());
                    self.marks.lock().unwrap_or_else(|e| e.into_inner())[self.next] =
                        Some((self.start.elapsed(), n, line.trim().to_string()));
                    self.next += 1;
                }
            }
            self.line.clear();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One esvm boot: its phases, and for an SEV-ES boot its launch time and VMGEXITs.
#[derive(Debug, Clone, Default)]
struct Boot {
    phases: Phases,
    launch: Option<Duration>,
    vmgexits: Option<VmgexitCounts>,
}

/// Boot the kernel on the software vCPU: a plain guest, or with `platform` an SEV-ES guest
/// launched through that secure processor.
fn esvm_boot(
    args: &LinuxBenchArgs,
    kernel: &[u8],
    initrd: &[u8],
    platform: Option<&std::path::Path>,
) -> Result<Boot, Box<dyn std::error::Error>> {
    let control = Arc::new(OnceLock::new());
    let marks = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let writer = MarkerWriter::new(&MARKERS, start, control.clone(), marks.clone());
    let config = MachineConfig {
        backend: BackendKind::Emu,
        vm_type: if platform.is_some() {
            VmType::SevEs
        } else {
            VmType::Plain
        },
        mem_size: args.mem,
        vcpus: 1,
        max_instructions: None,
    };
    let mut machine = Machine::new(&config, Box::new(writer))?;
    let boot = machine.load_linux(&LinuxImage {
        name: &args.kernel.display().to_string(),
        kernel,
        initrd: Some(initrd),
        cmdline: &args.cmdline,
    })?;
    let launch = match platform {
        Some(platform) => {
            let t = Instant::now();
            esvm::sev_launch::launch(
                &mut machine,
                &boot.written_pages(),
                &SevLaunchArgs {
                    platform,
                    session: None,
                    measurement_out: None,
                    secret: None,
                    policy: None,
                },
            )?;
            Some(t.elapsed())
        }
        None => None,
    };
    // After loading (and launching), which needs the machine unshared.
    let _ = control.set(machine.control().clone());
    let outcome = machine.run()?;
    let end = start.elapsed();
    if !matches!(outcome, Outcome::Reset(_) | Outcome::PowerOff(_)) {
        return Err(LinuxBenchError::Ended(outcome.describe()).into());
    }
    let marks = marks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut p = Phases::default();
    for (i, m) in MARKERS.iter().enumerate() {
        let Some((at, n, _)) = marks[i] else {
            return Err(LinuxBenchError::MissingMarker(m).into());
        };
        p.at[i] = Some((at, n));
    }
    p.at[2] = Some((end, machine.instructions()));
    Ok(Boot {
        phases: p,
        launch,
        vmgexits: machine.vmgexits(),
    })
}

fn qemu_boot(args: &LinuxBenchArgs) -> Result<Phases, LinuxBenchError> {
    let mem_mib = (args.mem >> 20).to_string();
    let start = Instant::now();
    let mut child = Command::new(&args.qemu)
        .args([
            "-accel",
            "tcg",
            "-M",
            "microvm,acpi=off,pic=on,pit=on,rtc=on,isa-serial=on",
        ])
        .args([
            "-cpu",
            "qemu64,-apic",
            "-m",
            &mem_mib,
            "-nographic",
            "-no-reboot",
        ])
        .args(["-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&args.kernel)
        .arg("-initrd")
        .arg(&args.initrd)
        .args(["-append", &args.cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| LinuxBenchError::QemuStart {
            qemu: args.qemu.clone(),
            source,
        })?;
    let stdout = child.stdout.take().expect("piped");
    // Read on a thread so a hung QEMU can be killed at the timeout.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut phases = Phases::default();
    let mut next = 0;
    let mut tail = String::new();
    let deadline = start + Duration::from_secs(args.timeout_s);
    while next < MARKERS.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                if line.contains(MARKERS[next]) {
                    phases.at[next] = Some((at, None));
                    next += 1;
                }
                tail = line;
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LinuxBenchError::QemuHung {
                    marker: MARKERS[next],
                    timeout_s: args.timeout_s,
                    tail,
                });
            }
        }
    }
    // The reboot ends QEMU (-no-reboot).
    let end = loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break start.elapsed(),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break start.elapsed();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    phases.at[2] = Some((end, None));
    Ok(phases)
}

/// The run that reached the reboot first.
fn best<T>(runs: Vec<T>, phases: impl Fn(&T) -> &Phases) -> Option<T> {
    runs.into_iter()
        .min_by_key(|r| phases(r).at[2].map(|(t, _)| t))
}

pub fn run(args: &LinuxBenchArgs, json: bool) -> Result<u8, Box<dyn std::error::Error>> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| LinuxBenchError::Read {
            path: path.clone(),
            source,
        })
    };
    let sev_platform = if args.sev_es {
        if args.mem < crate::cli::run::MIN_SEV_LINUX_MEM {
            return Err(LinuxBenchError::SevMemTooSmall {
                min: crate::cli::run::MIN_SEV_LINUX_MEM >> 20,
            }
            .into());
        }
        Some(args.platform.as_deref().expect("clap requires --platform"))
    } else {
        None
    };
    let kernel = read(&args.kernel)?;
    let initrd = read(&args.initrd)?;
    let repeat = args.repeat.max(1);
    let mut esvm_runs = Vec::new();
    let mut sev_runs = Vec::new();
    let mut qemu_runs = Vec::new();
    // Interleaved, so all sides see the same machine load.
    for i in 0..repeat {
        eprintln!("bench linux: esvm boot {}/{repeat}", i + 1);
        esvm_runs.push(esvm_boot(args, &kernel, &initrd, None)?);
        if let Some(platform) = sev_platform {
            eprintln!("bench linux: esvm SEV-ES boot {}/{repeat}", i + 1);
            sev_runs.push(esvm_boot(args, &kernel, &initrd, Some(platform))?);
        }
        if args.qemu != "none" {
            eprintln!("bench linux: QEMU TCG boot {}/{repeat}", i + 1);
            qemu_runs.push(qemu_boot(args)?);
        }
    }
    let e = best(esvm_runs, |b| &b.phases).expect("at least one boot");
    let q = best(qemu_runs, |p| p);
    let sev = best(sev_runs, |b| &b.phases);
    if json {
        super::bench::print_json(&report(args, &e.phases, q.as_ref(), sev.as_ref()))?;
        return Ok(0);
    }
    println!(
        "Linux boot, best of {repeat}: kernel {}, initrd {}",
        args.kernel.display(),
        args.initrd.display()
    );
    println!("command line: {}", args.cmdline);
    println!();
    print!("{}", qemu_table(&e.phases, q.as_ref()));
    if let Some(sev) = &sev {
        println!();
        if let Some(launch) = sev.launch {
            println!(
                "SEV-ES beside plain (the SEV-ES times include its launch, LAUNCH_START to \
                 LAUNCH_FINISH: {:.2} s):",
                launch.as_secs_f64()
            );
        }
        println!();
        print!("{}", sev_table(&e.phases, &sev.phases));
        if let Some(counts) = &sev.vmgexits {
            println!();
            println!(
                "VMGEXITs of the SEV-ES boot ({} in all), by SVM exit code (GHCB requests) or \
                 MSR-protocol request:",
                group(counts.total())
            );
            println!();
            print!("{}", vmgexit_table(counts));
        }
    }
    Ok(0)
}

/// One phase of `bench linux`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LinuxPhase {
    pub phase: String,
    pub esvm_wall_s: f64,
    pub esvm_instructions: u64,
    pub esvm_mips: f64,
    /// QEMU TCG's wall time (absent with --qemu none).
    pub qemu_wall_s: Option<f64>,
    /// esvm wall / QEMU wall.
    pub esvm_over_qemu: Option<f64>,
    /// The SEV-ES boot (with --sev-es): its wall time, including its launch.
    pub sev_es_wall_s: Option<f64>,
    pub sev_es_instructions: Option<u64>,
    /// SEV-ES wall / plain wall.
    pub sev_es_over_plain: Option<f64>,
}

/// VMGEXITs of one kind.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LinuxVmgexits {
    /// The request's name (AMD APM / GHCB specification), or `unknown`.
    pub request: String,
    /// `ghcb` (SW_EXITCODE), `msr` (MSR-protocol GHCBInfo) or `unreadable`.
    pub protocol: String,
    pub code: Option<u64>,
    pub count: u64,
}

/// What `bench linux` prints.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LinuxReport {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub mem_bytes: u64,
    /// Boots per side; each side's figures are of its fastest boot.
    pub repeat: u32,
    pub phases: Vec<LinuxPhase>,
    /// The SEV-ES launch, LAUNCH_START to LAUNCH_FINISH (with --sev-es).
    pub sev_es_launch_s: Option<f64>,
    /// The SEV-ES boot's VMGEXITs, most frequent first (with --sev-es).
    pub sev_es_vmgexits: Option<Vec<LinuxVmgexits>>,
}

fn report(
    args: &LinuxBenchArgs,
    e: &Phases,
    q: Option<&Phases>,
    sev: Option<&Boot>,
) -> LinuxReport {
    let phases = PHASES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (et, insns) = at(e, i);
            let qt = q.and_then(|q| q.at[i]).map(|(t, _)| t.as_secs_f64());
            let s = sev.map(|s| at(&s.phases, i));
            LinuxPhase {
                phase: name.to_string(),
                esvm_wall_s: et,
                esvm_instructions: insns,
                esvm_mips: insns as f64 / et / 1e6,
                qemu_wall_s: qt,
                esvm_over_qemu: qt.map(|qt| et / qt),
                sev_es_wall_s: s.map(|(st, _)| st),
                sev_es_instructions: s.map(|(_, sn)| sn),
                sev_es_over_plain: s.map(|(st, _)| st / et),
            }
        })
        .collect();
    LinuxReport {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        mem_bytes: args.mem,
        repeat: args.repeat.max(1),
        phases,
        sev_es_launch_s: sev.and_then(|s| s.launch).map(|d| d.as_secs_f64()),
        sev_es_vmgexits: sev.and_then(|s| s.vmgexits.as_ref()).map(|c| {
            c.by_count()
                .into_iter()
                .map(|(k, count)| {
                    let (protocol, code) = match k {
                        VmgexitKind::Ghcb(code) => ("ghcb", Some(code)),
                        VmgexitKind::Msr(info) => ("msr", Some(u64::from(info))),
                        VmgexitKind::Unreadable => ("unreadable", None),
                    };
                    LinuxVmgexits {
                        request: k.name().unwrap_or("unknown").to_string(),
                        protocol: protocol.to_string(),
                        code,
                        count,
                    }
                })
                .collect()
        }),
    }
}

/// The wall time (s) of phase `i`, and its guest instructions (0 if not counted).
fn at(p: &Phases, i: usize) -> (f64, u64) {
    let (t, n) = p.at[i].expect("every phase was checked");
    (t.as_secs_f64(), n.unwrap_or(0))
}

/// esvm (plain) beside QEMU TCG, phase by phase.
fn qemu_table(e: &Phases, q: Option<&Phases>) -> String {
    let mut out = String::from(
        "| phase | esvm wall (s) | esvm guest instructions | esvm MIPS | QEMU TCG wall (s) | esvm / QEMU |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (i, name) in PHASES.iter().enumerate() {
        let (et, insns) = at(e, i);
        let (qt, ratio) = match q.and_then(|q| q.at[i]) {
            Some((qt, _)) => (
                format!("{:.2}", qt.as_secs_f64()),
                format!("{:.2}x", et / qt.as_secs_f64()),
            ),
            None => ("-".into(), "-".into()),
        };
        out += &format!(
            "| {name} | {et:.2} | {} | {:.0} | {qt} | {ratio} |\n",
            group(insns),
            insns as f64 / et / 1e6,
        );
    }
    out
}

/// The SEV-ES boot beside the plain one, phase by phase.
fn sev_table(plain: &Phases, sev: &Phases) -> String {
    let mut out = String::from(
        "| phase | plain wall (s) | SEV-ES wall (s) | SEV-ES / plain | plain guest instructions | SEV-ES guest instructions |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (i, name) in PHASES.iter().enumerate() {
        let (pt, pn) = at(plain, i);
        let (st, sn) = at(sev, i);
        out += &format!(
            "| {name} | {pt:.2} | {st:.2} | **{:.2}x** | {} | {} |\n",
            st / pt,
            group(pn),
            group(sn),
        );
    }
    out
}

/// The request column (its name in the AMD APM / GHCB specification) and the code column
/// of a VMGEXIT kind.
fn kind_cells(k: VmgexitKind) -> (String, String) {
    let name = k.name().unwrap_or("unknown");
    match k {
        VmgexitKind::Ghcb(code) => (name.to_string(), format!("{code:#x}")),
        VmgexitKind::Msr(info) => (format!("MSR protocol {name}"), format!("{info:#05x}")),
        VmgexitKind::Unreadable => ("unreadable GHCB".to_string(), "-".to_string()),
    }
}

/// VMGEXITs by request, most frequent first, with their share.
fn vmgexit_table(c: &VmgexitCounts) -> String {
    let total = c.total().max(1) as f64;
    let mut out =
        String::from("| request | exit code | VMGEXITs | share |\n|---|---:|---:|---:|\n");
    for (k, n) in c.by_count() {
        let (name, code) = kind_cells(k);
        out += &format!(
            "| {name} | {code} | {} | {:.1}% |\n",
            group(n),
            100.0 * n as f64 / total
        );
    }
    out
}

/// 1234567 -> "1,234,567".
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_digits() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1234567), "1,234,567");
    }

    fn phases(secs: [f64; 3], insns: [u64; 3]) -> Phases {
        let mut p = Phases::default();
        for i in 0..3 {
            p.at[i] = Some((Duration::from_secs_f64(secs[i]), Some(insns[i])));
        }
        p
    }

    #[test]
    fn plain_beside_qemu_table() {
        let e = phases([1.5, 2.0, 2.5], [300_000_000, 400_000_000, 500_000_000]);
        let q = Phases {
            at: [
                Some((Duration::from_secs(1), None)),
                Some((Duration::from_secs(2), None)),
                Some((Duration::from_secs(5), None)),
            ],
        };
        let t = qemu_table(&e, Some(&q));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].starts_with("| phase | esvm wall (s) |"));
        assert_eq!(
            lines[2],
            "| entry to /init | 1.50 | 300,000,000 | 200 | 1.00 | 1.50x |"
        );
        assert_eq!(
            lines[4],
            "| entry to reboot | 2.50 | 500,000,000 | 200 | 5.00 | 0.50x |"
        );
        let t = qemu_table(&e, None);
        assert!(t.lines().nth(3).unwrap().ends_with("| - | - |"), "{t}");
    }

    #[test]
    fn sev_es_beside_plain_table() {
        let plain = phases([1.0, 2.0, 2.2], [10, 20, 22]);
        let sev = phases([1.3, 2.8, 3.3], [11, 24, 27]);
        let t = sev_table(&plain, &sev);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "| phase | plain wall (s) | SEV-ES wall (s) | SEV-ES / plain | plain guest instructions | SEV-ES guest instructions |"
        );
        assert_eq!(lines[1], "|---|---:|---:|---:|---:|---:|");
        assert_eq!(
            lines[2],
            "| entry to /init | 1.00 | 1.30 | **1.30x** | 10 | 11 |"
        );
        assert_eq!(
            lines[3],
            "| entry to end of workload | 2.00 | 2.80 | **1.40x** | 20 | 24 |"
        );
        assert_eq!(
            lines[4],
            "| entry to reboot | 2.20 | 3.30 | **1.50x** | 22 | 27 |"
        );
    }

    #[test]
    fn vmgexit_table_names_exit_codes_and_requests() {
        let mut c = VmgexitCounts::default();
        for _ in 0..3000 {
            c.record(VmgexitKind::Ghcb(0x7b));
        }
        c.record(VmgexitKind::Ghcb(0x8000_0001));
        c.record(VmgexitKind::Msr(0x004));
        c.record(VmgexitKind::Ghcb(0x1234));
        c.record(VmgexitKind::Unreadable);
        let t = vmgexit_table(&c);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| request | exit code | VMGEXITs | share |");
        assert_eq!(lines[2], "| IOIO | 0x7b | 3,000 | 99.9% |");
        assert_eq!(lines[3], "| unknown | 0x1234 | 1 | 0.0% |");
        assert_eq!(lines[4], "| MMIO_READ | 0x80000001 | 1 | 0.0% |");
        assert_eq!(lines[5], "| MSR protocol CPUID_REQ | 0x004 | 1 | 0.0% |");
        assert_eq!(lines[6], "| unreadable GHCB | - | 1 | 0.0% |");
        assert_eq!(lines.len(), 7);
    }

    #[test]
    fn json_report_carries_every_phase_and_the_vmgexits() {
        let args = LinuxBenchArgs {
            kernel: "bzImage".into(),
            initrd: "initrd".into(),
            cmdline: "console=ttyS0".into(),
            mem: 256 << 20,
            repeat: 2,
            qemu: "none".into(),
            timeout_s: 1,
            sev_es: true,
            platform: Some("plat".into()),
        };
        let plain = phases([1.0, 2.0, 4.0], [100_000_000, 200_000_000, 300_000_000]);
        let mut vmgexits = VmgexitCounts::default();
        vmgexits.record(VmgexitKind::Ghcb(0x7b));
        vmgexits.record(VmgexitKind::Ghcb(0x7b));
        vmgexits.record(VmgexitKind::Msr(0x004));
        let sev = Boot {
            phases: phases([1.5, 3.0, 5.0], [110, 220, 330]),
            launch: Some(Duration::from_millis(250)),
            vmgexits: Some(vmgexits),
        };
        let text = serde_json::to_string(&report(&args, &plain, None, Some(&sev))).unwrap();
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        let p = r["phases"].as_array().unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1]["phase"], "entry to end of workload");
        assert_eq!(p[1]["esvm_instructions"], 200_000_000);
        assert_eq!(p[1]["esvm_mips"], 100.0);
        assert_eq!(p[1]["qemu_wall_s"], serde_json::Value::Null);
        assert_eq!(p[2]["sev_es_over_plain"], 1.25);
        assert_eq!(p[2]["sev_es_instructions"], 330);
        assert_eq!(r["sev_es_launch_s"], 0.25);
        let v = r["sev_es_vmgexits"].as_array().unwrap();
        assert_eq!(v[0]["request"], "IOIO");
        assert_eq!(
            (v[0]["code"].as_u64(), v[0]["count"].as_u64()),
            (Some(0x7b), Some(2))
        );
        assert_eq!(v[1]["protocol"], "msr");
        let q = phases([2.0, 4.0, 8.0], [0, 0, 0]);
        let r = report(&args, &plain, Some(&q), None);
        assert_eq!(r.phases[0].esvm_over_qemu, Some(0.5));
        assert!(r.sev_es_vmgexits.is_none() && r.phases[0].sev_es_wall_s.is_none());
    }

    #[test]
    fn markers_are_noted_once_in_order() {
        let marks = Arc::new(Mutex::new(Vec::new()));
        let mut w = MarkerWriter::new(
            &MARKERS,
            Instant::now(),
            Arc::new(OnceLock::new()),
            marks.clone(),
        );
        w.write_all(b"workload digest=1\n[ 1.0] Run /init as init process\nx")
            .unwrap();
        w.write_all(b"\nworkload digest=2\n").unwrap();
        let m = marks.lock().unwrap();
        assert_eq!(m.len(), MARKERS.len());
        assert_eq!(m[0].as_ref().unwrap().2, "[ 1.0] Run /init as init process");
        assert_eq!(m[1].as_ref().unwrap().2, "workload digest=2");
    }
}
