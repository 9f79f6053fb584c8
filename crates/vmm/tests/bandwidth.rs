//! Scenario tests of the migration bandwidth cap with real processes: `esvm run
//! --api-socket`, `esvm receive`, `esvm ctl migrate --max-bandwidth` and `esvm ctl
//! migrate-set`.
//!
//! The demo guest writes its whole dirty buffer within its first few hundred iterations;
//! it is then paused, so the migration's full pass carries a known amount (the buffer) and
//! nothing is dirtied meanwhile. Over loopback, uncapped, that pass takes a fraction of a
//! second; capped, it cannot take less than size / cap.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use esvm_control::{ApiClient, MigrationPhase, MigrationStatus};

use common::{ctl, ctl_ok, text, wait_socket, Proc};

const MEM: &str = "64M";
const MEM_BYTES: u64 = 64 << 20;
/// The dirty buffer the full pass carries (plus the guest image and page tables).
const DIRTY_MIB: u64 = 24;
const MIB: u64 = 1 << 20;
/// Enough iterations that the guest is still running when it is paused.
const ITERATIONS: u64 = 600_000;

fn demo_args() -> String {
    format!("iterations={ITERATIONS} dirty-mib={DIRTY_MIB}")
}

/// `esvm receive --once --listen tcp:127.0.0.1:0 --api-socket SOCK`; returns it and its
/// URL.
fn receive(sock: &Path) -> (Proc, String) {
    let mut p = Proc::spawn(
        None,
        &[
            "receive",
            "--once",
            "--listen",
            "tcp:127.0.0.1:0",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    let err = p.wait_stderr("listening on ", Duration::from_secs(30));
    let url = err
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    (p, url)
}

/// The demo guest on 64 MiB, run until its dirty buffer is written, then paused.
fn paused_source(sock: &Path) -> Proc {
    let args = demo_args();
    let mut p = Proc::spawn(
        None,
        &[
            "run",
            "--api-socket",
            sock.to_str().unwrap(),
            "--start-paused",
            "--mem",
            MEM,
            "demo",
            "--",
            &args,
        ],
    );
    wait_socket(&mut p, sock);
    ctl_ok(sock, &["resume"]);
    // 384 iterations write every page of the 24 MiB buffer; wait for well over that.
    p.wait_stdout("tick 1\n", Duration::from_secs(60));
    ctl_ok(sock, &["pause"]);
    p
}

/// Poll the source's status until its migration ends; returns every status seen.
fn follow(sock: &Path) -> Vec<MigrationStatus> {
    let mut client = ApiClient::connect(sock).expect("connect to the source");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let m = client
            .status()
            .expect("status")
            .migration
            .expect("the migration is in the status");
        let end = m.phase.is_terminal();
        seen.push(m);
        if end {
            return seen;
        }
        assert!(Instant::now() < deadline, "the migration did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resume the guest at the destination and check that the output of both processes
/// together is exactly the demo's.
fn finish_at_destination(src: &mut Proc, dest: &mut Proc, dsock: &Path) {
    assert_eq!(src.wait(Duration::from_secs(30)), 0, "{}", src.stderr());
    dest.wait_stderr("stays paused here", Duration::from_secs(30));
    wait_socket(dest, dsock);
    ctl_ok(dsock, &["resume"]);
    assert_eq!(dest.wait(Duration::from_secs(120)), 0, "{}", dest.stderr());
    let expected =
        esvm_guests::demo::expected_output(MEM_BYTES, 1, &demo_args(), ITERATIONS, DIRTY_MIB);
    assert_eq!(src.stdout() + &dest.stdout(), expected);
}

/// `--max-bandwidth 16M`: every bandwidth the status reports stays at or below 16 MiB/s,
/// the status carries the cap, and the migration takes at least bytes sent / cap (about
/// 1.5 s here; uncapped it takes a fraction of that). The guest arrives intact.
#[test]
fn a_bandwidth_cap_holds_in_the_progress_figures() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, dsock) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let (mut dest, url) = receive(&dsock);
    let mut src = paused_source(&sock);
    let cap = 16 * MIB;
    let out = ctl_ok(
        &sock,
        &["migrate", &url, "--max-bandwidth", "16M", "--detach"],
    );
    assert!(out.contains("started"), "{out}");
    let seen = follow(&sock);
    let last = seen.last().unwrap();
    assert_eq!(last.phase, MigrationPhase::Completed, "{last:?}");
    assert!(
        last.bytes_sent >= DIRTY_MIB * MIB,
        "the full pass carried the buffer: {last:?}"
    );
    let floor_ms = last.bytes_sent as f64 / cap as f64 * 1e3;
    assert!(
        last.elapsed_ms as f64 >= floor_ms * 0.98,
        "{} bytes in {} ms is faster than the cap allows (at least {floor_ms:.0} ms)",
        last.bytes_sent,
        last.elapsed_ms
    );
    let measured: Vec<f64> = seen.iter().map(|m| m.bandwidth_bytes_per_sec).collect();
    assert!(
        measured.iter().any(|&b| b > 0.0),
        "no bandwidth was reported: {measured:?}"
    );
    for m in &seen {
        assert!(m.bandwidth_bytes_per_sec <= cap as f64, "{m:?}");
        assert_eq!(m.max_bandwidth_bytes_per_sec, Some(cap), "{m:?}");
    }
    // The cap is what limits: the measured figure comes close to it.
    let best = measured.iter().copied().fold(0.0, f64::max);
    assert!(best >= cap as f64 * 0.5, "{measured:?}");
    finish_at_destination(&mut src, &mut dest, &dsock);
}

/// At 4 MiB/s the full pass would take over 6 s; `esvm ctl migrate-set --max-bandwidth
/// 1G` during it lets the migration finish within a few seconds, and the status reports
/// the new cap and downtime limit at once. With no migration running, migrate-set is
/// refused (exit status 1, `invalid_state`).
#[test]
fn migrate_set_raises_the_cap_during_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, dsock) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let (mut dest, url) = receive(&dsock);
    let mut src = paused_source(&sock);

    let o = ctl(&sock, &["migrate-set", "--max-bandwidth", "1G"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("no migration is in progress") && err.contains("(invalid_state)"),
        "{err}"
    );

    let t0 = Instant::now();
    ctl_ok(
        &sock,
        &["migrate", &url, "--max-bandwidth", "4M", "--detach"],
    );
    let mut client = ApiClient::connect(&sock).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = client.status().unwrap().migration.unwrap();
        assert!(!m.phase.is_terminal(), "{m:?}");
        if m.phase == MigrationPhase::PreCopy && m.bytes_sent > 0 {
            assert_eq!(m.max_bandwidth_bytes_per_sec, Some(4 * MIB));
            break;
        }
        assert!(Instant::now() < deadline, "no pre-copy: {m:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The cap holds until it is raised: half a second later the migration is still in its
    // full pass, having sent no more than 4 MiB/s allows.
    std::thread::sleep(Duration::from_millis(500));
    let m = client.status().unwrap().migration.unwrap();
    assert_eq!(m.phase, MigrationPhase::PreCopy, "{m:?}");
    // (The slack covers the unpaced handshake frames.)
    let allowed = 4.0 * MIB as f64 * m.elapsed_ms as f64 / 1e3 + 65536.0;
    assert!(m.bytes_sent as f64 <= allowed, "{m:?}");
    let out = ctl_ok(
        &sock,
        &[
            "migrate-set",
            "--max-bandwidth",
            "1G",
            "--downtime-ms",
            "500",
        ],
    );
    assert!(
        out.contains("capped at 1 GiB/s, downtime limit 500 ms"),
        "{out}"
    );
    let m = client.status().unwrap().migration.unwrap();
    assert_eq!(m.max_bandwidth_bytes_per_sec, Some(1 << 30), "{m:?}");
    assert_eq!(m.downtime_limit_ms, 500, "{m:?}");
    drop(client);
    let seen = follow(&sock);
    let took = t0.elapsed();
    let last = seen.last().unwrap();
    assert_eq!(last.phase, MigrationPhase::Completed, "{last:?}");
    let at_old_cap = Duration::from_secs_f64(last.bytes_sent as f64 / (4 * MIB) as f64);
    assert!(
        at_old_cap >= Duration::from_secs(6),
        "the full pass carried the buffer: {last:?}"
    );
    assert!(
        took < at_old_cap / 2,
        "raising the cap did not speed it up: {took:?} (at 4 MiB/s: {at_old_cap:?})"
    );
    finish_at_destination(&mut src, &mut dest, &dsock);
}
