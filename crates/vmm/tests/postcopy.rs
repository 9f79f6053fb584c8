//! Scenario tests of post-copy live migration with real processes (`esvm run`, `esvm
//! receive`, `esvm ctl migrate --postcopy-after`, `esvm ctl postcopy`): the demo guest
//! migrated in post-copy prints exactly what it prints without migrating (plain and SEV-ES),
//! and a failure after the switch ends both sides with a clear error (exit status 125),
//! never with a wrong checksum.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ctl, ctl_ok, text, wait_socket, Proc, ESVM};

const MEM: &str = "32M";
const MEM_BYTES: u64 = 32 << 20;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

fn demo_args(iterations: u64, dirty_mib: u64) -> String {
    format!("iterations={iterations} dirty-mib={dirty_mib}")
}

fn expected(iterations: u64, dirty_mib: u64, sev: bool) -> String {
    let args = demo_args(iterations, dirty_mib);
    if sev {
        esvm_guests::demo::expected_output_sev(MEM_BYTES, 1, &args, iterations, dirty_mib)
    } else {
        esvm_guests::demo::expected_output(MEM_BYTES, 1, &args, iterations, dirty_mib)
    }
}

fn checksum_of(out: &str) -> Option<&str> {
    out.lines().find(|l| l.starts_with("checksum="))
}

/// Demo iterations that keep the guest busy for roughly `secs` seconds here.
fn iterations_for(secs: f64) -> u64 {
    let n = 100_000u64;
    let t = Instant::now();
    let o = Command::new(ESVM)
        .args(["run", "--mem", MEM, "demo", "--", &demo_args(n, 2)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let rate = n as f64 / t.elapsed().as_secs_f64();
    ((rate * secs) as u64).clamp(50_000, 50_000_000)
}

/// `esvm receive --listen tcp:127.0.0.1:0 --once EXTRA`; returns it and its URL.
fn receive(extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["receive", "--listen", "tcp:127.0.0.1:0", "--once"];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(None, &args);
    let err = p.wait_stderr("listening on ", Duration::from_secs(30));
    let url = err
        .split("listening on ")
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    (p, url)
}

/// `esvm run --api-socket SOCK --mem 32M [--sev-es --platform P sevdemo | demo] -- ARGS`,
/// running.
fn source(sock: &Path, args: &str, sev: Option<&Path>) -> Proc {
    let mut a = vec!["run", "--api-socket", sock.to_str().unwrap(), "--mem", MEM];
    match sev {
        Some(p) => a.extend(["--sev-es", "--platform", p.to_str().unwrap(), "sevdemo"]),
        None => a.push("demo"),
    }
    a.push("--");
    a.extend(args.split(' '));
    let mut p = Proc::spawn(None, &a);
    wait_socket(&mut p, sock);
    p
}

/// Two SEV platforms sharing one emulated AMD root, and the source's exported chain.
fn sev_platforms(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = dir.join("ca");
    let (p1, p2, chain) = (dir.join("p1"), dir.join("p2"), dir.join("p1.chain"));
    for p in [&p1, &p2] {
        let o = Command::new(ESVM)
            .args(["platform", "init", "--dir", p.to_str().unwrap()])
            .args(["--amd-ca", ca.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }
    let o = Command::new(ESVM)
        .args(["platform", "export", "--dir", p1.to_str().unwrap()])
        .args(["--out", chain.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    (p1, p2, chain)
}

/// The guest migrated in post-copy (after one pre-copy pass, under a bandwidth cap so that
/// it runs at the destination with pages missing and faults on them) prints exactly the
/// demo's output, split across the two processes.
fn postcopy_keeps_the_demo_exact(sev: bool) {
    let dir = tempdir();
    let sock = dir.path().join("src.sock");
    let dsock = dir.path().join("dst.sock");
    let iters = iterations_for(4.0);
    let plats = sev.then(|| sev_platforms(dir.path()));
    let mut extra = vec!["--api-socket", dsock.to_str().unwrap()];
    if let Some((_, p2, _)) = &plats {
        extra.extend(["--platform", p2.to_str().unwrap()]);
    }
    let (mut b, url) = receive(&extra);
    let mut a = source(
        &sock,
        &demo_args(iters, 2),
        plats.as_ref().map(|p| p.0.as_path()),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut args = vec![
        "--json",
        "migrate",
        &url,
        "--postcopy-after",
        "1",
        "--max-bandwidth",
        "8M",
    ];
    if let Some((_, _, chain)) = &plats {
        args.extend(["--trust", chain.to_str().unwrap()]);
    }
    let out = ctl_ok(&sock, &args);
    let st: serde_json::Value = serde_json::from_str(&out).expect("JSON status");
    assert_eq!(st["phase"], "completed", "{st}");
    assert!(st["postcopy"]["switch_ms"].is_u64(), "{st}");
    eprintln!("post-copy figures: {}", st["postcopy"]);
    // The destination reports the incoming post-copy migration while its guest runs on.
    let o = ctl(&dsock, &["status", "--json"]);
    if o.status.code() == Some(0) {
        let d: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON status");
        let m = &d["migration"];
        assert!(
            m["phase"] == "completed" || m["phase"] == "post_copy",
            "{d}"
        );
        assert!(
            m["url"]
                .as_str()
                .is_some_and(|u| u.starts_with("incoming from ")),
            "{d}"
        );
        assert!(m["postcopy"]["demand_faults"].is_u64(), "{d}");
        assert!(m["postcopy"]["pages_at_switch"].as_u64() > Some(0), "{d}");
        eprintln!("destination: {m}");
    }
    assert_eq!(a.wait(Duration::from_secs(30)), 0, "{}", a.stderr());
    assert_eq!(b.wait(Duration::from_secs(120)), 0, "{}", b.stderr());
    assert!(
        b.stderr().contains("switched to post-copy"),
        "{}",
        b.stderr()
    );
    let all = a.stdout() + &b.stdout();
    assert_eq!(
        all,
        expected(iters, 2, sev),
        "a:\n{}\nb:\n{}",
        a.stdout(),
        b.stdout()
    );
    assert_eq!(
        checksum_of(&all),
        checksum_of(&expected(iters, 2, false)),
        "the same checksum as the plain demo that never moved"
    );
}

#[test]
fn postcopy_keeps_the_plain_demo_exact() {
    postcopy_keeps_the_demo_exact(false);
}

#[test]
fn postcopy_keeps_the_sev_es_demo_exact() {
    postcopy_keeps_the_demo_exact(true);
}

/// Start a migration that switches to post-copy before any pass, with everything after
/// the switch at 1 MiB/s (several seconds of post-copy), and wait until the destination
/// `b` runs the guest.
fn switch_at_once_over_a_slow_link(sock: &Path, url: &str, b: &mut Proc) {
    let o = ctl(
        sock,
        &[
            "migrate",
            url,
            "--postcopy-after",
            "0",
            "--max-bandwidth",
            "1M",
            "--detach",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    b.wait_stderr("switched to post-copy", Duration::from_secs(30));
}

/// Kill the source right after the switch: the destination, whose guest runs with pages
/// missing, stops it and exits 125 naming the failure; it never prints a checksum (a guest
/// reading a missing page as zero would print a wrong one).
#[test]
fn a_source_killed_after_the_switch_stops_the_destination() {
    let dir = tempdir();
    let sock = dir.path().join("src.sock");
    let dsock = dir.path().join("dst.sock");
    let iters = iterations_for(20.0);
    let (mut b, url) = receive(&["--api-socket", dsock.to_str().unwrap()]);
    let mut a = source(&sock, &demo_args(iters, 8), None);
    std::thread::sleep(Duration::from_millis(300));
    switch_at_once_over_a_slow_link(&sock, &url, &mut b);
    // While pages still arrive, the destination cannot be snapshotted or migrated on (the
    // missing pages are not here).
    wait_socket(&mut b, &dsock);
    let snap = dir.path().join("snap");
    let o = ctl(&dsock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("still arriving"),
        "{}",
        text(&o.stderr)
    );
    a.kill();
    let code = b.wait(Duration::from_secs(120));
    assert_eq!(
        code,
        125,
        "stdout:\n{}\nstderr:\n{}",
        b.stdout(),
        b.stderr()
    );
    let err = b.stderr();
    assert!(
        err.contains("failed after the switch to post-copy") && err.contains("lost"),
        "{err}"
    );
    assert!(
        checksum_of(&b.stdout()).is_none(),
        "the destination's guest must not finish: {}",
        b.stdout()
    );
}

/// Kill the destination after the switch: the source cannot resume (its copy is stale), so
/// it ends with exit status 125 and `ctl migrate` reports the migration `lost`.
#[test]
fn a_destination_killed_after_the_switch_ends_the_source_with_the_loss() {
    let dir = tempdir();
    let sock = dir.path().join("src.sock");
    let iters = iterations_for(20.0);
    let (mut b, url) = receive(&[]);
    let mut a = source(&sock, &demo_args(iters, 8), None);
    std::thread::sleep(Duration::from_millis(300));
    switch_at_once_over_a_slow_link(&sock, &url, &mut b);
    b.kill();
    let code = a.wait(Duration::from_secs(120));
    assert_eq!(
        code,
        125,
        "stdout:\n{}\nstderr:\n{}",
        a.stdout(),
        a.stderr()
    );
    let err = a.stderr();
    assert!(err.contains("neither side holds the whole guest"), "{err}");
    assert!(checksum_of(&a.stdout()).is_none(), "{}", a.stdout());
}

/// A guest dirtying memory faster than a 1 MiB/s link cannot converge; `esvm ctl postcopy`
/// switches it by hand, and it finishes exactly at the destination.
#[test]
fn ctl_postcopy_switches_a_migration_that_cannot_converge() {
    let dir = tempdir();
    let sock = dir.path().join("src.sock");
    let iters = iterations_for(5.0);
    let (mut b, url) = receive(&[]);
    let mut a = source(&sock, &demo_args(iters, 8), None);
    std::thread::sleep(Duration::from_millis(200));
    let o = ctl(
        &sock,
        &["migrate", &url, "--max-bandwidth", "1M", "--detach"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // Wait for pre-copy to be under way, then switch.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st: serde_json::Value =
            serde_json::from_str(&ctl_ok(&sock, &["status", "--json"])).unwrap();
        if st["migration"]["phase"] == "pre_copy" {
            break;
        }
        assert!(Instant::now() < deadline, "no pre-copy: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = ctl_ok(&sock, &["postcopy"]);
    assert!(out.contains("post-copy requested"), "{out}");
    assert_eq!(a.wait(Duration::from_secs(60)), 0, "{}", a.stderr());
    assert!(a.stderr().contains("migrated to"), "{}", a.stderr());
    assert_eq!(b.wait(Duration::from_secs(120)), 0, "{}", b.stderr());
    assert!(
        b.stderr().contains("switched to post-copy"),
        "{}",
        b.stderr()
    );
    assert_eq!(a.stdout() + &b.stdout(), expected(iters, 8, false));
    // Without a migration there is nothing to switch.
    let dir2 = tempdir();
    let s2 = dir2.path().join("idle.sock");
    let mut idle = source(&s2, &demo_args(iters, 2), None);
    let o = ctl(&s2, &["postcopy"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("no migration is in progress"),
        "{}",
        text(&o.stderr)
    );
    idle.kill();
}

/// A destination that cannot run a guest with pages missing (the kvm backend) is refused
/// before the switch: the guest keeps running at the source.
#[test]
fn a_kvm_destination_is_refused_before_the_switch() {
    let dir = tempdir();
    let sock = dir.path().join("src.sock");
    let iters = iterations_for(3.0);
    let (_b, url) = receive(&["--backend", "kvm"]);
    let mut a = source(&sock, &demo_args(iters, 2), None);
    let o = ctl(&sock, &["migrate", &url, "--postcopy-after", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("cannot do post-copy"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(a.wait(Duration::from_secs(60)), 0, "{}", a.stderr());
    assert_eq!(a.stdout(), expected(iters, 2, false));
}
