//! Scenario tests of the built-in `smp` guest: it starts its APs by INIT-SIPI-SIPI and all
//! CPUs hammer shared counters with LOCK'd instructions; nothing may be lost. The expected
//! totals are computed here, independently of the guest's own check.

mod common;

use common::{esvm, Proc};
use std::time::Duration;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The totals the guest must reach with `cpus` CPUs and `iterations` rounds each, in the
/// order of its `smp: inc=...` line: inc, xadd, cas, locked-a, locked-b, pair-lo, pair-hi.
fn expected_totals(cpus: u64, iterations: u64) -> [u64; 7] {
    let total = cpus * iterations;
    let (mut xadd, mut cas, mut b) = (0u64, 0u64, 0u64);
    for cpu in 0..cpus {
        for i in 0..iterations {
            xadd += (i % 7) + cpu + 1;
            cas += (i ^ cpu) & 0xff;
            b += cpu;
        }
    }
    b += (0..total).map(|a| a & 3).sum::<u64>();
    let hi = (1..=cpus).map(|c| c * iterations).sum();
    [total, xadd, cas, total, b, total, hi]
}

fn totals_line(t: &[u64; 7]) -> String {
    format!(
        "smp: inc={} xadd={} cas={} locked={}/{} pair={}:{}",
        t[0], t[1], t[2], t[3], t[4], t[5], t[6]
    )
}

/// The guest's checksum of the totals: FNV-1a over cpus, iterations and the seven totals
/// as little-endian u64s.
fn expected_checksum(cpus: u64, iterations: u64, t: &[u64; 7]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [cpus, iterations].iter().chain(t.iter()) {
        for b in v.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("checksum={h:016x}")
}

fn run_smp(vcpus: u32, guest_args: &[&str]) -> std::process::Output {
    let n = vcpus.to_string();
    let mut args = vec!["run", "--vcpus", &n, "smp", "--"];
    args.extend_from_slice(guest_args);
    esvm(&args)
}

#[test]
fn smp_guest_loses_nothing_on_1_2_and_4_vcpus() {
    let iterations = 3000u64;
    for cpus in [1u64, 2, 4] {
        let o = run_smp(cpus as u32, &["iterations=3000"]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
        let t = expected_totals(cpus, iterations);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            format!("smp: cpus={cpus} iterations={iterations}")
        );
        assert_eq!(lines[1], totals_line(&t), "{out}");
        assert!(lines[2].starts_with("smp: contention "), "{out}");
        assert_eq!(lines[3], format!("smp: cpus={cpus} ok"));
        assert_eq!(lines[4], expected_checksum(cpus, iterations, &t));
        assert_eq!(lines.len(), 5, "{out}");
    }
}

#[test]
fn smp_guest_default_iterations_and_argument_errors() {
    let o = run_smp(2, &[]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(out.starts_with("smp: cpus=2 iterations=10000\n"), "{out}");
    assert!(
        out.contains(&format!("{}\n", totals_line(&expected_totals(2, 10_000)))),
        "{out}"
    );
    let o = run_smp(2, &["mode=sloppy"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).contains("unknown mode=sloppy"), "{}", stdout(&o));
}

/// mode=plain-inc on one CPU cannot lose anything: the same totals as mode=locked.
#[test]
fn smp_guest_plain_inc_on_one_vcpu_is_exact() {
    let o = run_smp(1, &["iterations=2000", "mode=plain-inc"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("mode=plain-inc"), "{out}");
    assert!(
        out.contains(&totals_line(&expected_totals(1, 2000))),
        "{out}"
    );
}

/// Checks a plain-inc run on `cpus` CPUs: either exact (possible when the vCPUs take turns
/// and no turn ends between the load and the store) or FAILED with exactly the `inc`
/// counter short and every LOCK'd total exact. Returns the number of lost increments.
fn check_plain_inc(o: &std::process::Output, cpus: u64, iterations: u64) -> u64 {
    let out = stdout(o);
    let t = expected_totals(cpus, iterations);
    let inc_line = out
        .lines()
        .find(|l| l.starts_with("smp: inc="))
        .unwrap_or_else(|| panic!("no totals line:\n{out}\n{}", stderr(o)));
    let got_inc: u64 = inc_line["smp: inc=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Everything but the non-atomic counter is exact.
    let rest = totals_line(&t);
    assert_eq!(
        inc_line[inc_line.find(" xadd=").unwrap()..],
        rest[rest.find(" xadd=").unwrap()..],
        "{out}"
    );
    assert!(got_inc <= t[0], "{out}");
    let lost = t[0] - got_inc;
    if lost == 0 {
        assert_eq!(o.status.code(), Some(0), "{out}");
        assert!(out.contains(&format!("smp: cpus={cpus} ok\n")), "{out}");
    } else {
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains(&format!(
                "smp: inc={got_inc} expected {} (lost {lost})\n",
                t[0]
            )),
            "{out}"
        );
        assert!(out.contains(&format!("smp: cpus={cpus} FAILED\n")), "{out}");
    }
    lost
}

/// Under one-thread turns a plain increment may or may not lose updates; whatever happens,
/// the guest's report must agree with the exact totals.
#[test]
fn smp_guest_plain_inc_report_agrees_with_the_totals() {
    for cpus in [2u64, 4] {
        let o = run_smp(cpus as u32, &["iterations=20000", "mode=plain-inc"]);
        check_plain_inc(&o, cpus, 20000);
    }
}

/// The evidence that the check can fail: with the vCPUs on parallel host threads (the
/// default), plain (non-LOCK'd) increments lose updates.
#[test]
fn smp_guest_plain_inc_loses_updates_on_parallel_vcpus() {
    // A loaded host may run the two vCPU threads one after the other for a while: grow
    // the run until they overlap.
    let mut lost = 0;
    for iterations in [200_000u64, 1_000_000, 4_000_000] {
        let it = format!("iterations={iterations}");
        let o = run_smp(2, &[&it, "mode=plain-inc"]);
        lost = check_plain_inc(&o, 2, iterations);
        if lost > 0 {
            break;
        }
    }
    assert!(lost > 0, "2 parallel vCPUs never lost a plain increment");
    // ... while the LOCK'd variant stays exact in parallel.
    let o = run_smp(2, &["iterations=200000"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains(&totals_line(&expected_totals(2, 200_000))));
}

/// `demo` stays single-threaded with several vCPUs: the same checksum as with one.
#[test]
fn demo_checksum_is_unchanged_with_4_vcpus() {
    let checksum = |o: &std::process::Output| {
        stdout(o)
            .lines()
            .find(|l| l.starts_with("checksum="))
            .map(str::to_string)
    };
    let one = esvm(&["run", "demo", "--", "iterations=3000"]);
    let four = esvm(&["run", "--vcpus", "4", "demo", "--", "iterations=3000"]);
    assert!(four.status.success(), "{}", stderr(&four));
    assert!(checksum(&one).is_some());
    assert_eq!(checksum(&one), checksum(&four));
}

/// SEV-ES with 2 and 4 vCPUs: the guest starts its APs through the AP jump table (the
/// protocol Linux uses) and loses nothing either.
#[test]
fn smp_guest_under_sev_es() {
    let dir = tempfile::tempdir().unwrap();
    let plat = dir.path().join("plat");
    let o = esvm(&["platform", "init", "--dir", plat.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The guest finds the AP jump table (AP_JUMP_TABLE GET), fills it and starts its APs by
    // INIT-SIPI-SIPI through the x2APIC MSRs; each AP leaves the AP stub's reset hold into
    // the guest's trampoline.
    for cpus in [2u64, 4] {
        let o = esvm(&[
            "run",
            "--sev-es",
            "--platform",
            plat.to_str().unwrap(),
            "--vcpus",
            &cpus.to_string(),
            "smp",
            "--",
            "iterations=1000",
        ]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
        assert!(
            out.starts_with(&format!("smp: cpus={cpus} iterations=1000\n")),
            "{out}"
        );
        assert!(
            out.contains(&totals_line(&expected_totals(cpus, 1000))),
            "{out}"
        );
        assert!(out.contains(&format!("smp: cpus={cpus} ok\n")), "{out}");
    }
}

/// KVM parks the APs and advertises one CPU: the guest runs on the boot vCPU. This host's
/// software-assisted KVM cannot emulate LOCK CMPXCHG16B on guest memory and stops with an
/// internal error naming it; both outcomes are accepted, nothing else.
#[test]
fn smp_guest_on_kvm_runs_on_the_boot_vcpu() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm cannot be opened");
        return;
    }
    let mut p = Proc::spawn(
        None,
        &[
            "run",
            "--backend",
            "kvm",
            "--vcpus",
            "2",
            "smp",
            "--",
            "iterations=1000",
        ],
    );
    let code = p.wait(Duration::from_secs(120));
    let (out, err) = (p.stdout(), p.stderr());
    assert!(out.starts_with(
        "smp: cpus=1 iterations=1000\nsmp: note: the boot info counts 2 vCPUs, CPUID advertises 1: the others stay parked\n"
    ), "{out}\n{err}");
    match code {
        0 => assert!(out.contains("smp: cpus=1 ok\n"), "{out}"),
        125 => assert!(
            err.contains("KVM could not emulate an instruction"),
            "{err}"
        ),
        other => panic!("exit status {other}\n{out}\n{err}"),
    }
}

/// The instruction count `ESVM_LOG=esvm=info` reports at the end of a run.
fn instructions_reported(o: &std::process::Output) -> String {
    let err = stderr(o);
    err.split("instructions=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no instructions= in {err}"))
        .to_string()
}

/// `args` run twice with the vCPUs in turns on one thread (`--deterministic`): the whole
/// output (contention counts included) and the instruction count replay exactly.
fn replays_exactly(args: &[&str], cpus: u32) {
    let run = || {
        std::process::Command::new(common::ESVM)
            .args(args)
            .env("ESVM_LOG", "esvm=info")
            .output()
            .unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(a.status.code(), Some(0), "{}\n{}", stdout(&a), stderr(&a));
    assert!(
        stdout(&a).contains(&format!("smp: cpus={cpus} ok\n")),
        "{}",
        stdout(&a)
    );
    assert_eq!(stdout(&a), stdout(&b));
    assert_eq!(instructions_reported(&a), instructions_reported(&b));
}

#[test]
fn smp_guest_replays_exactly_in_turns() {
    replays_exactly(
        &[
            "run",
            "--vcpus",
            "4",
            "--deterministic",
            "smp",
            "--",
            "iterations=5000",
        ],
        4,
    );
}

/// The same for an SEV-ES guest whose APs leave the AP stub through the jump table.
#[test]
fn an_sev_es_smp_guest_replays_exactly_in_turns() {
    let dir = tempfile::tempdir().unwrap();
    let plat = dir.path().join("plat");
    let o = esvm(&["platform", "init", "--dir", plat.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    replays_exactly(
        &[
            "run",
            "--sev-es",
            "--platform",
            plat.to_str().unwrap(),
            "--vcpus",
            "2",
            "--deterministic",
            "smp",
            "--",
            "iterations=2000",
        ],
        2,
    );
}

/// `--max-instructions` is one budget for all vCPUs: on parallel vCPUs the run stops at
/// exactly that many instructions, as the machine's own count after the run says too (each
/// vCPU thread used to take up to a slice beyond it).
#[test]
fn parallel_vcpus_stop_at_exactly_max_instructions() {
    for (cpus, limit) in [
        ("2", "1000000"),
        ("4", "1234567"),
        ("2", "777"),
        ("4", "2500001"),
    ] {
        for _ in 0..2 {
            let o = std::process::Command::new(common::ESVM)
                .args(["run", "--vcpus", cpus, "--max-instructions", limit, "smp"])
                .env("ESVM_LOG", "esvm=info")
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(123), "{}", stderr(&o));
            assert!(
                stderr(&o).contains(&format!("stopped after {limit} instructions")),
                "{cpus} vCPUs: {}",
                stderr(&o)
            );
            assert_eq!(instructions_reported(&o), limit, "{cpus} vCPUs");
        }
    }
}

/// A snapshot of a parallel run, taken while every vCPU works, restored with
/// `--deterministic`: the rest of the run replays exactly (output and instruction count),
/// restore after restore, and the totals are exact. `--parallel` restores it as it ran.
#[test]
fn a_snapshot_of_a_parallel_run_replays_exactly_with_restore_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let snap = dir.path().join("snap");
    let iterations = 1_000_000u64;
    let it = format!("iterations={iterations}");
    let mut p = Proc::spawn(
        None,
        &[
            "run",
            "--vcpus",
            "2",
            "--api-socket",
            sock.to_str().unwrap(),
            "smp",
            "--",
            &it,
        ],
    );
    common::wait_socket(&mut p, &sock);
    common::wait_vcpu_state(&sock, 1, "running");
    common::ctl_ok(&sock, &["snapshot", snap.to_str().unwrap()]);
    let before = p.stdout();
    p.kill();
    assert!(
        !before.contains(" ok\n"),
        "the run ended before the snapshot; raise the iterations:\n{before}"
    );
    let restore = |mode: &str| {
        std::process::Command::new(common::ESVM)
            .args(["restore", snap.to_str().unwrap(), mode])
            .env("ESVM_LOG", "esvm=info")
            .output()
            .unwrap()
    };
    let (a, b) = (restore("--deterministic"), restore("--deterministic"));
    assert_eq!(a.status.code(), Some(0), "{}\n{}", stdout(&a), stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
    assert_eq!(instructions_reported(&a), instructions_reported(&b));
    let t = expected_totals(2, iterations);
    let whole = format!("{before}{}", stdout(&a));
    assert!(whole.contains(&totals_line(&t)), "{whole}");
    assert!(
        whole.contains(&expected_checksum(2, iterations, &t)),
        "{whole}"
    );
    let c = restore("--parallel");
    assert_eq!(c.status.code(), Some(0), "{}", stderr(&c));
    assert!(stdout(&c).contains(&totals_line(&t)), "{}", stdout(&c));
}

/// `esvm ctl status` says how the vCPUs run, and `esvm receive --deterministic` changes it
/// for a VM that ran in parallel: the moved guest then runs in turns and still reaches
/// exact totals.
#[test]
fn a_parallel_vm_received_with_deterministic_runs_in_turns() {
    let dir = tempfile::tempdir().unwrap();
    let (src_sock, dest_sock) = (dir.path().join("src.sock"), dir.path().join("dest.sock"));
    let listen = format!("unix:{}", dir.path().join("mig.sock").display());
    let iterations = 1_000_000u64;
    let it = format!("iterations={iterations}");
    let mut dest = Proc::spawn(
        None,
        &[
            "receive",
            "--listen",
            &listen,
            "--once",
            "--deterministic",
            "--api-socket",
            dest_sock.to_str().unwrap(),
        ],
    );
    let mut src = Proc::spawn(
        None,
        &[
            "run",
            "--vcpus",
            "2",
            "--api-socket",
            src_sock.to_str().unwrap(),
            "smp",
            "--",
            &it,
        ],
    );
    common::wait_socket(&mut src, &src_sock);
    let status = |sock: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&common::ctl_ok(sock, &["--json", "status"])).unwrap()
    };
    assert_eq!(status(&src_sock)["vcpu_scheduling"], "parallel");
    assert!(common::ctl_ok(&src_sock, &["status"]).contains("2 vCPU(s), in parallel"));
    common::wait_vcpu_state(&src_sock, 1, "running");
    common::ctl_ok(&src_sock, &["migrate", &listen]);
    assert_eq!(src.wait(Duration::from_secs(60)), 0, "{}", src.stderr());
    assert!(
        !src.stdout().contains(" ok\n"),
        "the run ended before the move; raise the iterations"
    );
    common::wait_socket(&mut dest, &dest_sock);
    let got = status(&dest_sock);
    // The guest may have finished already (then the status says so, scheduling included).
    assert_eq!(got["vcpu_scheduling"], "deterministic", "{got}");
    assert_eq!(dest.wait(Duration::from_secs(120)), 0, "{}", dest.stderr());
    let t = expected_totals(2, iterations);
    let whole = format!("{}{}", src.stdout(), dest.stdout());
    assert!(whole.contains(&totals_line(&t)), "{whole}");
    assert!(
        whole.contains(&expected_checksum(2, iterations, &t)),
        "{whole}"
    );
}
