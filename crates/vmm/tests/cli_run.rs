//! Scenario tests: the `esvm` binary runs real guests on the software vCPU.

mod common;

use common::esvm;

use std::process::{Command, Output};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn checksum_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("checksum="))
        .unwrap_or_else(|| panic!("no checksum line in output:\n{out}"))
        .to_string()
}

#[test]
fn demo_runs_to_completion_with_ticks_and_checksum() {
    let o = esvm(&["run", "--", "iterations=20000"]);
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        stderr(&o)
    );
    assert!(out.contains("esvm demo guest"), "{out}");
    assert!(out.lines().any(|l| l == "tick 1"), "{out}");
    let sum = checksum_line(&out);
    assert_eq!(sum.len(), "checksum=".len() + 16, "{sum}");
    assert!(sum["checksum=".len()..]
        .chars()
        .all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn demo_is_deterministic_and_depends_on_its_arguments() {
    let a = checksum_line(&stdout(&esvm(&[
        "run",
        "demo",
        "--",
        "iterations=5000",
        "dirty-mib=1",
    ])));
    let b = checksum_line(&stdout(&esvm(&[
        "run",
        "demo",
        "--",
        "iterations=5000",
        "dirty-mib=1",
    ])));
    let c = checksum_line(&stdout(&esvm(&[
        "run",
        "demo",
        "--",
        "iterations=5001",
        "dirty-mib=1",
    ])));
    assert_eq!(a, b, "same arguments, same checksum");
    assert_ne!(a, c, "the checksum must depend on the workload");
}

#[test]
fn guest_exit_status_is_passed_through() {
    let o = esvm(&["run", "hello", "--", "exit=7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
}

#[test]
fn scenario_guests_pass() {
    for guest in ["pagefault", "usermode", "timer", "exceptions", "sse"] {
        let o = esvm(&["run", guest]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "guest {guest} failed:\nstdout:\n{}\nstderr:\n{}",
            stdout(&o),
            stderr(&o)
        );
    }
}

#[test]
fn triple_fault_is_a_shutdown() {
    let o = esvm(&["run", "triplefault"]);
    assert_eq!(
        o.status.code(),
        Some(i32::from(esvm::outcome::EXIT_GUEST_SHUTDOWN))
    );
    assert_eq!(o.status.code(), Some(121));
    assert!(stderr(&o).contains("shut down"), "{}", stderr(&o));
    assert!(stderr(&o).contains("triple fault"), "{}", stderr(&o));
}

#[test]
fn instruction_limit_stops_the_guest() {
    let o = esvm(&["run", "--max-instructions", "10000", "demo"]);
    assert_eq!(o.status.code(), Some(123));
    assert!(stderr(&o).contains("10000 instructions"), "{}", stderr(&o));
}

#[test]
fn bad_inputs_give_clear_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let not_elf = dir.path().join("not-elf.bin");
    std::fs::write(&not_elf, b"hello, this is not an ELF file").unwrap();
    let truncated = dir.path().join("truncated.elf");
    let demo = esvm_guests_elf("demo");
    std::fs::write(&truncated, &demo[..100]).unwrap();

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["run".into(), "/nonexistent/guest.elf".into()],
            "cannot read guest image",
        ),
        (vec!["run".into(), "no-such-guest".into()], "unknown guest"),
        (vec!["run".into(), not_elf.display().to_string()], "ELF"),
        (vec!["run".into(), truncated.display().to_string()], "ELF"),
        (
            vec!["run".into(), "--mem".into(), "1M".into()],
            "guest memory 1 MiB is too small: it must be at least 4 MiB",
        ),
        (
            vec!["receive".into(), "--listen".into(), "udp://h:1".into()],
            "use tcp://HOST:PORT",
        ),
        (
            vec!["run".into(), "--mem".into(), "4097K".into()],
            "not a multiple of the 4 KiB page size",
        ),
        (
            vec!["run".into(), "--mem".into(), "lots".into()],
            "invalid size",
        ),
        (
            vec!["run".into(), "--backend".into(), "xen".into()],
            "unknown backend",
        ),
    ];
    for (args, expect) in cases {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = esvm(&args);
        let err = stderr(&o);
        assert_ne!(o.status.code(), Some(0), "{args:?} must fail");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(
            err.to_lowercase().contains(&expect.to_lowercase()),
            "{args:?}: expected {expect:?} in: {err}"
        );
    }
}

/// A built-in guest image, from the same crate the binary embeds.
fn esvm_guests_elf(name: &str) -> Vec<u8> {
    esvm_guests::builtin(name)
        .expect("built-in guest")
        .elf
        .to_vec()
}

/// A bare size is MiB: `--mem 64` gives the guest 64 MiB (it was 64 bytes).
#[test]
fn a_bare_memory_size_means_mib() {
    let o = esvm(&["run", "--mem", "64", "demo", "--", "iterations=10"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("demo: memory 64 MiB,"), "{out}");
}

#[test]
fn guests_lists_the_builtins() {
    let o = esvm(&["guests"]);
    let out = stdout(&o);
    for g in ["demo", "pagefault", "triplefault", "cpubench"] {
        assert!(
            out.lines().any(|l| l.starts_with(g)),
            "{g} missing from:\n{out}"
        );
    }
}

#[test]
fn demo_checksum_matches_the_host_model() {
    // The demo's workload is also compiled into the host crate: an independent computation.
    for (iterations, dirty) in [(3000u64, 0u64), (2000, 1)] {
        let out = stdout(&esvm(&[
            "run",
            "demo",
            "--",
            &format!("iterations={iterations}"),
            &format!("dirty-mib={dirty}"),
        ]));
        let want = format!(
            "checksum={:016x}",
            esvm_guests::demo::expected_checksum(iterations, dirty)
        );
        assert_eq!(checksum_line(&out), want);
    }
}

/// The same guest on the software vCPU and on KVM must agree (KVM is an independent x86
/// implementation; on these machines ring-0 code under KVM is slow, so keep the run short).
#[test]
fn demo_checksum_is_the_same_on_kvm() {
    if let Err(e) = esvm_hv::open(esvm_hv::BackendKind::Kvm) {
        println!("skipped: kvm backend unavailable: {e}");
        return;
    }
    let emu = esvm(&["run", "--backend", "emu", "demo", "--", "iterations=1500"]);
    let kvm = esvm(&["run", "--backend", "kvm", "demo", "--", "iterations=1500"]);
    assert_eq!(kvm.status.code(), Some(0), "{}", stderr(&kvm));
    assert_eq!(
        stdout(&emu),
        stdout(&kvm),
        "serial output differs between emu and kvm"
    );
}

/// An error is printed once: the message, then only those causes it does not already say.
#[test]
fn an_error_and_its_cause_are_printed_once() {
    let o = esvm(&["run", "--kernel", "/nonexistent/bzImage"]);
    assert_eq!(o.status.code(), Some(125));
    let err = stderr(&o);
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "stderr: {err}"
    );
    assert!(
        err.starts_with("esvm: error: cannot read the kernel /nonexistent/bzImage"),
        "stderr: {err}"
    );
}

/// A reporting command whose reader goes away ends quietly (no panic, no backtrace), as
/// Unix tools do, killed by SIGPIPE.
#[test]
fn a_report_piped_into_a_closed_reader_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    // `esvm guests` writes one line per guest into a pipe nobody reads any more.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_esvm"))
        .arg("guests")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?} stderr: {err}",
        out.status
    );
}

/// An SEV-ES guest that halts with interrupts off ends the VM as a power-off: the VMM decides
/// from the interrupt-mask bit the hardware exposes, never from the protected registers.
#[test]
fn an_sev_es_guest_that_halts_powers_off_instead_of_crashing_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let plat = dir.path().join("plat");
    let o = esvm(&["platform", "init", "--dir", plat.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = esvm(&[
        "run",
        "--sev-es",
        "--platform",
        plat.to_str().unwrap(),
        "sev-pf",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    assert!(err.contains("powered off"), "stderr: {err}");
    assert!(!err.contains("refused"), "stderr: {err}");
}

/// `esvm run --api-socket` says when its socket is ready.
#[test]
fn run_says_when_its_api_socket_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let o = esvm(&[
        "run",
        "--api-socket",
        sock.to_str().unwrap(),
        "--max-instructions",
        "1000",
    ]);
    let err = stderr(&o);
    assert!(
        err.contains(&format!("esvm: API socket ready at {}", sock.display())),
        "stderr: {err}"
    );
}

/// With more vCPUs than they start, the built-in guests run as before: their APs wait for a
/// SIPI that never comes, and the instruction count is the boot vCPU's.
#[test]
fn builtin_guests_run_unchanged_with_waiting_aps() {
    let one = esvm(&["run", "demo", "--", "iterations=2000"]);
    let two = esvm(&["run", "--vcpus", "2", "demo", "--", "iterations=2000"]);
    assert!(
        one.status.success() && two.status.success(),
        "{}",
        stderr(&two)
    );
    assert_eq!(checksum_line(&stdout(&one)), checksum_line(&stdout(&two)));
    // The same output but for the vCPU count the demo reports.
    assert_eq!(stdout(&one), stdout(&two).replace("2 vCPU(s)", "1 vCPU(s)"));
    let hello = esvm(&["run", "--vcpus", "4", "hello", "--", "exit=7"]);
    assert_eq!(hello.status.code(), Some(7), "{}", stderr(&hello));
}
