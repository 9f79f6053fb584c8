//! `esvm bench linux`: boot a Linux kernel to a userland workload and its reboot on the
//! software vCPU, beside QEMU's TCG booting the same kernel, initrd and command line in the
//! same run.
//!
//! Phases are taken from the console: "Run /init as init process" (the kernel is about to
//! start userland), "workload digest=" (the workload's last line) and the end of the run
//! (the reboot). For esvm each phase has the wall time and the guest instructions retired;
//! QEMU (`-accel tcg -M microvm` with no APIC, as REFERENCE.md's comparison) has wall time
//! only — its TCG does not count instructions without slowing down (-icount).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Args;
use esvm::machine::{Machine, MachineConfig, VmControl};
use esvm::outcome::Outcome;
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
    /// Guest RAM of both runs.
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

/// Console sink that notes when the markers pass, with the instructions retired by then.
struct MarkerWriter {
    line: Vec<u8>,
    next: usize,
    start: Instant,
    control: Arc<OnceLock<Arc<VmControl>>>,
    phases: Arc<Mutex<Phases>>,
}

impl Write for MarkerWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if let Some(marker) = MARKERS.get(self.next) {
                if String::from_utf8_lossy(&self.line).contains(marker) {
                    let n = self.control.get().map(|c| c.instructions());
                    self.phases.lock().unwrap_or_else(|e| e.into_inner()).at[self.next] =
                        Some((self.start.elapsed(), n));
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

fn esvm_boot(
    args: &LinuxBenchArgs,
    kernel: &[u8],
    initrd: &[u8],
) -> Result<Phases, Box<dyn std::error::Error>> {
    let control = Arc::new(OnceLock::new());
    let phases = Arc::new(Mutex::new(Phases::default()));
    let start = Instant::now();
    let writer = MarkerWriter {
        line: Vec::new(),
        next: 0,
        start,
        control: control.clone(),
        phases: phases.clone(),
    };
    let config = MachineConfig {
        backend: BackendKind::Emu,
        vm_type: VmType::Plain,
        mem_size: args.mem,
        vcpus: 1,
        max_instructions: None,
    };
    let mut machine = Machine::new(&config, Box::new(writer))?;
    machine.load_linux(&LinuxImage {
        name: &args.kernel.display().to_string(),
        kernel,
        initrd: Some(initrd),
        cmdline: &args.cmdline,
    })?;
    // After loading, which needs the machine unshared.
    let _ = control.set(machine.control().clone());
    let outcome = machine.run()?;
    let end = start.elapsed();
    if !matches!(outcome, Outcome::Reset(_) | Outcome::PowerOff) {
        return Err(LinuxBenchError::Ended(outcome.describe()).into());
    }
    let mut p = phases.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (i, m) in MARKERS.iter().enumerate() {
        if p.at[i].is_none() {
            return Err(LinuxBenchError::MissingMarker(m).into());
        }
    }
    p.at[2] = Some((end, machine.instructions()));
    Ok(p)
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

fn best(runs: Vec<Phases>) -> Phases {
    runs.into_iter()
        .min_by_key(|p| p.at[2].map(|(t, _)| t))
        .unwrap_or_default()
}

pub fn run(args: &LinuxBenchArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| LinuxBenchError::Read {
            path: path.clone(),
            source,
        })
    };
    let kernel = read(&args.kernel)?;
    let initrd = read(&args.initrd)?;
    let repeat = args.repeat.max(1);
    let mut esvm_runs = Vec::new();
    let mut qemu_runs = Vec::new();
    // Interleaved, so both sides see the same machine load.
    for i in 0..repeat {
        eprintln!("bench linux: esvm boot {}/{repeat}", i + 1);
        esvm_runs.push(esvm_boot(args, &kernel, &initrd)?);
        if args.qemu != "none" {
            eprintln!("bench linux: QEMU TCG boot {}/{repeat}", i + 1);
            qemu_runs.push(qemu_boot(args)?);
        }
    }
    let e = best(esvm_runs);
    let q = (!qemu_runs.is_empty()).then(|| best(qemu_runs));
    println!(
        "Linux boot, best of {repeat}: kernel {}, initrd {}",
        args.kernel.display(),
        args.initrd.display()
    );
    println!("command line: {}", args.cmdline);
    println!();
    println!("| phase | esvm wall (s) | esvm guest instructions | esvm MIPS | QEMU TCG wall (s) | esvm / QEMU |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, name) in PHASES.iter().enumerate() {
        let (et, en) = e.at[i].expect("every phase was checked");
        let insns = en.unwrap_or(0);
        let (qt, ratio) = match q.as_ref().and_then(|q| q.at[i]) {
            Some((qt, _)) => (
                format!("{:.2}", qt.as_secs_f64()),
                format!("{:.2}x", et.as_secs_f64() / qt.as_secs_f64()),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {name} | {:.2} | {} | {:.0} | {qt} | {ratio} |",
            et.as_secs_f64(),
            group(insns),
            insns as f64 / et.as_secs_f64() / 1e6,
        );
    }
    Ok(0)
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

    #[test]
    fn markers_are_noted_once_in_order() {
        let phases = Arc::new(Mutex::new(Phases::default()));
        let mut w = MarkerWriter {
            line: Vec::new(),
            next: 0,
            start: Instant::now(),
            control: Arc::new(OnceLock::new()),
            phases: phases.clone(),
        };
        w.write_all(b"workload digest=1\n[ 1.0] Run /init as init process\nx")
            .unwrap();
        w.write_all(b"\nworkload digest=2\n").unwrap();
        let p = phases.lock().unwrap();
        assert!(p.at[0].is_some() && p.at[1].is_some() && p.at[2].is_none());
    }
}
