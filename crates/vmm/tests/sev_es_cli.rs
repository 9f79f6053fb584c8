//! `esvm run --sev-es` end to end: a platform made by `esvm platform init`, the SEV-ES demo,
//! the launch measurement, and a plain guest that has no #VC handler.

mod common;

use common::{esvm, text};

use std::path::Path;
use std::process::Output;

fn platform(dir: &Path) -> String {
    let p = dir.join("platform");
    let o = esvm(&[
        "platform",
        "init",
        "--dir",
        p.to_str().unwrap(),
        "--ark-bits",
        "2048",
    ]);
    assert!(o.status.success(), "platform init: {}", text(&o.stderr));
    // Without a terminal: a line per step, saying honestly how long key generation takes,
    // and each step's time.
    let err = text(&o.stderr);
    assert!(
        err.contains("(two RSA-2048 keys); this takes 5 to 30 s") && !err.contains("few seconds"),
        "{err}"
    );
    assert_eq!(err.matches("esvm: done in ").count(), 2, "{err}");
    p.display().to_string()
}

#[test]
fn sev_es_demo_runs_like_the_plain_demo_and_prints_its_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path());
    let mfile = dir.path().join("measurement.bin");
    let o = esvm(&[
        "run",
        "--sev-es",
        "--platform",
        &plat,
        "--measurement-out",
        mfile.to_str().unwrap(),
        "--",
        "iterations=4000",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(text(&o.stderr).contains("SEV-ES launch measurement"));
    assert_eq!(std::fs::read(&mfile).unwrap().len(), 51, "measurement file");
    let plain = esvm(&["run", "demo", "--", "iterations=4000"]);
    let sum = |o: &Output| {
        text(&o.stdout)
            .lines()
            .find(|l| l.starts_with("checksum="))
            .map(str::to_string)
    };
    assert!(sum(&o).is_some(), "{}", text(&o.stdout));
    assert_eq!(sum(&o), sum(&plain), "SEV-ES and plain demo checksums");
    let ticks = |o: &Output| {
        text(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("tick "))
            .count()
    };
    assert_eq!(ticks(&o), ticks(&plain));
}

#[test]
fn plain_guest_without_vc_handler_gives_a_clear_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path());
    let o = esvm(&["run", "--sev-es", "--platform", &plat, "hello"]);
    assert_eq!(
        o.status.code(),
        Some(i32::from(esvm::outcome::EXIT_GUEST_SHUTDOWN)),
        "{}",
        text(&o.stderr)
    );
    let err = text(&o.stderr);
    assert!(err.contains("shut down") && err.contains("#VC"), "{err}");
}

#[test]
fn smoke_guest_termination_request_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path());
    let o = esvm(&["run", "--sev-es", "--platform", &plat, "sev-smoke"]);
    assert_eq!(o.status.code(), Some(122), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("requested termination"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn sev_es_usage_errors_are_clear() {
    let o = esvm(&["run", "--sev-es"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("--platform"),
        "{}",
        text(&o.stderr)
    );
    let o = esvm(&["run", "--sev-es", "--platform", "/nonexistent/plat"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("esvm platform init"),
        "{}",
        text(&o.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path());
    let o = esvm(&["run", "--sev-es", "--platform", &plat, "--backend", "kvm"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("emu backend"),
        "{}",
        text(&o.stderr)
    );
}

/// The whole owner flow: export the chain, make a session, launch with it, and verify the
/// measurement against a digest the owner computes from the guest image alone.
#[test]
fn owner_verifies_the_launch_from_the_guest_image() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path());
    let d = |n: &str| dir.path().join(n).display().to_string();
    let o = esvm(&[
        "platform",
        "export",
        "--dir",
        &plat,
        "--out",
        &d("chain.bin"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // A policy without ES is refused when the session is made, not at the launch.
    for no_es in ["0x1", "nodbg,nosend"] {
        let o = esvm(&[
            "owner",
            "session",
            "--chain",
            &d("chain.bin"),
            "--policy",
            no_es,
            "--out",
            &d("no-es"),
        ]);
        assert_eq!(o.status.code(), Some(125), "{no_es}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains("lacks ES"), "{}", text(&o.stderr));
        assert!(!dir.path().join("no-es").exists());
    }
    let o = esvm(&[
        "owner",
        "session",
        "--chain",
        &d("chain.bin"),
        "--policy",
        "es",
        "--out",
        &d("owner"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = esvm(&[
        "run",
        "--sev-es",
        "--platform",
        &plat,
        "--session",
        &d("owner"),
        "--measurement-out",
        &d("m.bin"),
        "sev-smoke",
    ]);
    assert_eq!(o.status.code(), Some(122), "{}", text(&o.stderr));
    for (name, expect_ok) in [("sev-smoke", true), ("sevdemo", false)] {
        let image = dir.path().join(name);
        std::fs::write(&image, esvm_guests::builtin(name).unwrap().elf).unwrap();
        let o = esvm(&[
            "owner",
            "verify",
            "--session",
            &d("owner"),
            "--measurement",
            &d("m.bin"),
            "--guest",
            image.to_str().unwrap(),
        ]);
        assert_eq!(
            o.status.success(),
            expect_ok,
            "{name}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
}

#[test]
fn sev_es_mmio_goes_through_the_ghcb_to_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path());
    let o = esvm(&["run", "--sev-es", "--platform", &plat, "sev-mmio"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// The machine's local APIC through MSRs, plain and SEV-ES alike: `sev-apic` finds x2APIC
/// and the TSC-deadline timer in CPUID, switches to x2APIC mode, reads and writes x2APIC
/// registers, gets #GP for the accesses the APIC refuses and its TSC-deadline interrupts on
/// time. For the SEV-ES guest every access goes through #VC, the GHCB and the hypervisor to
/// the same exits of the VMM; both runs see the timers fire equally late (the same
/// instructions between the deadline and the handler's RDTSC).
#[test]
fn the_local_apic_msrs_and_tsc_deadline_timer_work_plain_and_sev_es() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path());
    let plain = esvm(&["run", "sev-apic", "--", "slack=1000"]);
    let sev = esvm(&[
        "run",
        "--sev-es",
        "--platform",
        &plat,
        "sev-apic",
        "--",
        "slack=1000",
    ]);
    let mut fired = Vec::new();
    for (o, mode) in [(&plain, "plain"), (&sev, "SEV-ES")] {
        let out = text(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
        assert!(out.contains(&format!("sev-apic: {mode} guest;")), "{out}");
        assert!(
            out.contains("sev-apic: refused accesses raise #GP"),
            "{out}"
        );
        assert!(out.contains("sev-apic: all checks passed"), "{out}");
        fired.push(
            out.lines()
                .filter(|l| l.contains("ticks after its deadline"))
                .map(|l| l.split("fired ").nth(1).unwrap().to_string())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(fired[0].len(), 3, "{fired:?}");
    assert_eq!(fired[0], fired[1], "plain and SEV-ES timers differ");
}

/// An SEV-ES guest of esvm's own with several vCPUs runs on its boot vCPU: its APs start
/// in the AP start stub and park in the AP reset hold (the guest never sends them a SIPI),
/// which neither keeps the guest from finishing nor draws a warning.
#[test]
fn an_sev_es_guest_with_two_vcpus_runs_on_its_boot_vcpu_while_its_ap_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path());
    let o = esvm(&[
        "run",
        "--sev-es",
        "--platform",
        &plat,
        "--vcpus",
        "2",
        "--",
        "iterations=1000",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("checksum="), "{}", text(&o.stdout));
    assert!(!text(&o.stderr).contains("WARN"), "{}", text(&o.stderr));
}
