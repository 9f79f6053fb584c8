//! Stopping a VM (signals, `esvm ctl shutdown`), exit statuses, `--help` and `--version`,
//! with real `esvm` processes.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{ctl, text, wait_socket, Proc, ESVM};
use esvm::outcome::{StopSignal, EXIT_STATUSES, EXIT_USAGE};
use esvm_control::{ApiClient, VmState};

/// A demo guest that runs far longer than any test.
const LONG: &str = "iterations=2000000000";
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn signal(p: &Proc, s: StopSignal) {
    // SAFETY: kill only sends a signal to the child we started (still unreaped).
    let rc = unsafe { libc::kill(p.id() as libc::pid_t, s.number()) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

fn run_with_socket(sock: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["run", "--api-socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["demo", "--", LONG]);
    let mut p = Proc::spawn(None, &args);
    wait_socket(&mut p, sock);
    p
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly() {
    for (s, extra) in [
        (StopSignal::Terminate, &[][..]),
        (StopSignal::Interrupt, &[][..]),
        // A paused VM stops too.
        (StopSignal::Terminate, &["--start-paused"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm.sock");
        let mut p = run_with_socket(&sock, extra);
        signal(&p, s);
        let code = p.wait(EXIT_TIMEOUT);
        let err = p.stderr();
        assert_eq!(code, i32::from(s.exit_status()), "{s:?} {extra:?}: {err}");
        assert_eq!(code, if s == StopSignal::Interrupt { 130 } else { 143 });
        assert!(
            err.contains(&format!("esvm: guest demo stopped by {}", s.name())),
            "{err}"
        );
        assert!(!sock.exists(), "the API socket file was left behind");
    }
}

#[test]
fn ctl_shutdown_stops_the_vm_and_says_how_it_ended() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut p = run_with_socket(&sock, &[]);
    let before = ApiClient::connect(&sock).unwrap().status().unwrap();
    assert_eq!((before.exit_status, before.end_reason), (None, None));
    let o = ctl(&sock, &["shutdown"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).trim(),
        "the VM ended: the VM was stopped by `esvm ctl shutdown` (exit status 0)"
    );
    assert_eq!(p.wait(EXIT_TIMEOUT), 0);
    assert!(
        p.stderr()
            .contains("esvm: guest demo: the VM was stopped by `esvm ctl shutdown`"),
        "{}",
        p.stderr()
    );
    assert!(!sock.exists());
}

#[test]
fn the_shutdown_reply_is_the_final_status() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut p = run_with_socket(&sock, &["--start-paused"]);
    let end = ApiClient::connect(&sock).unwrap().shutdown().unwrap();
    assert_eq!(end.state, VmState::Exited);
    assert_eq!(end.exit_status, Some(0));
    assert_eq!(
        end.end_reason.as_deref(),
        Some("the VM was stopped by `esvm ctl shutdown`")
    );
    assert_eq!(p.wait(EXIT_TIMEOUT), 0);
}

/// A migration whose destination never answers the handshake: a stop waits for it (after
/// cancelling it), and a second signal ends the process at once.
#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp:{}", silent.local_addr().unwrap());
    let mut p = run_with_socket(&sock, &[]);
    let o = ctl(&sock, &["migrate", &url, "--detach"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // The destination has the connection but says nothing.
    let (_conn, _) = silent.accept().unwrap();
    signal(&p, StopSignal::Interrupt);
    p.wait_stderr("stopping the VM", EXIT_TIMEOUT);
    std::thread::sleep(Duration::from_millis(200));
    if p.alive() {
        signal(&p, StopSignal::Interrupt);
        assert_eq!(p.wait(EXIT_TIMEOUT), 130);
        assert!(
            p.stderr().contains("SIGINT again: exiting at once"),
            "{}",
            p.stderr()
        );
    } else {
        // The cancel reached the migration first: the VM stopped cleanly.
        assert_eq!(p.wait(EXIT_TIMEOUT), 130, "{}", p.stderr());
    }
    assert!(!sock.exists());
}

#[test]
fn a_signal_before_a_guest_runs_ends_receive() {
    let mut p = Proc::spawn(None, &["receive", "--listen", "tcp:127.0.0.1:0"]);
    p.wait_stderr("listening on", EXIT_TIMEOUT);
    signal(&p, StopSignal::Terminate);
    assert_eq!(p.wait(EXIT_TIMEOUT), 143);
    assert!(
        p.stderr().contains("stopped by SIGTERM before a guest ran"),
        "{}",
        p.stderr()
    );
}

#[test]
fn usage_errors_exit_120_and_help_lists_every_status() {
    for args in [
        &["run", "--bogus"][..],
        &["ctl"][..],
        &["nonsense"][..],
        &[][..],
    ] {
        let o = Command::new(ESVM).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(i32::from(EXIT_USAGE)), "{args:?}");
        assert_eq!(o.status.code(), Some(120));
        assert!(!text(&o.stderr).is_empty());
    }
    // The top-level help and the help of each command that runs a guest.
    for args in [
        &["--help"][..],
        &["-h"],
        &["run", "--help"],
        &["receive", "--help"],
        &["restore", "--help"],
    ] {
        let o = Command::new(ESVM).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(0));
        let help = text(&o.stdout);
        for row in EXIT_STATUSES {
            let line = format!("{}  {}", status_text(&row), row.meaning);
            assert!(help.contains(&line), "{args:?}: no {line:?} in\n{help}");
        }
    }
}

fn status_text(row: &esvm::outcome::ExitStatusDoc) -> String {
    if row.from == row.to {
        row.from.to_string()
    } else {
        format!("{}-{}", row.from, row.to)
    }
}

/// README's table of exit statuses is the one `--help` prints (from the same constants).
#[test]
fn readme_lists_every_status() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(readme_path).unwrap();
    for row in EXIT_STATUSES {
        let line = format!("| {} | {} |", status_text(&row), row.meaning);
        assert!(readme.contains(&line), "README.md lacks the row\n{line}");
    }
}

#[test]
fn version_names_the_revision_and_the_formats() {
    let o = Command::new(ESVM).arg("--version").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let v = text(&o.stdout);
    assert!(
        v.starts_with(&format!("esvm {} (git ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let printed = v
        .split("(git ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap();
    let rev = printed.trim_end_matches("-dirty");
    if git(&["rev-parse", "HEAD"]).is_some() {
        // The commit the binary was built from: HEAD, or an ancestor if a commit came after
        // the build.
        assert!(
            rev.len() >= 7 && rev.chars().all(|c| c.is_ascii_hexdigit()),
            "{v}"
        );
        assert!(
            git(&["merge-base", "--is-ancestor", rev, "HEAD"]).is_some(),
            "{rev} is not a commit of this checkout: {v}"
        );
    } else {
        assert_eq!(printed, "unknown", "{v}");
    }
    for line in [
        format!(
            "snapshot format {} (sealed SEV-ES snapshots: {})",
            esvm::snapshot::SNAPSHOT_VERSION,
            esvm::snapshot::SEALED_SNAPSHOT_VERSION
        ),
        format!("migration protocol {}", esvm_migration::PROTOCOL_VERSION),
        format!("control API {}", esvm_control::PROTOCOL_VERSION),
    ] {
        assert!(v.contains(&line), "no {line:?} in {v}");
    }
}

/// A client polling `status` while the guest ends by itself sees how it ended: the VM
/// keeps its API socket a moment for a connected client.
#[test]
fn a_polling_client_sees_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut p = Proc::spawn(
        None,
        &[
            "run",
            "--api-socket",
            sock.to_str().unwrap(),
            "--start-paused",
            "hello",
            "--",
            "exit=7",
        ],
    );
    wait_socket(&mut p, &sock);
    let mut c = ApiClient::connect(&sock).unwrap();
    c.call(&esvm_control::Request::Resume).unwrap();
    let end = loop {
        let s = c
            .status()
            .expect("the VM closed its API before a status showed its end");
        if matches!(s.state, VmState::Exited | VmState::Failed) {
            break s;
        }
        // As a person or a script polls: not always with a request under way.
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(end.state, VmState::Exited);
    assert_eq!(end.exit_status, Some(7));
    assert_eq!(
        end.end_reason.as_deref(),
        Some("the guest exited with status 7")
    );
    assert_eq!(p.wait(EXIT_TIMEOUT), 7);
}

/// `esvm receive --listen tcp:127.0.0.1:0`; returns it and the URL it prints (the one to
/// give `migrate`).
fn receiver() -> (Proc, String) {
    let mut p = Proc::spawn(None, &["receive", "--listen", "tcp:127.0.0.1:0"]);
    let err = p.wait_stderr("listening on ", EXIT_TIMEOUT);
    let addr = err
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(addr.starts_with("tcp://"), "{err}");
    (p, addr)
}

/// Wait until the source's migration copies memory (pre-copy: the destination has part of
/// the VM, nothing committed). False if it completed first (the guest happened not to dirty
/// enough memory to keep pre-copy going).
fn wait_pre_copy(c: &mut ApiClient) -> bool {
    let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
    loop {
        let m = match c.status() {
            Ok(s) => s.migration.unwrap(),
            Err(_) => return false, // the source ended: it migrated
        };
        if m.phase == esvm_control::MigrationPhase::Completed {
            return false;
        }
        assert!(!m.phase.is_terminal(), "the migration failed: {m:?}");
        if m.phase == esvm_control::MigrationPhase::PreCopy && m.pass >= 1 && m.pages_sent > 0 {
            return true;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A signal during a live migration, to either end, leaves the VM running in exactly one
/// place: the interrupted destination never runs it and the source runs on; an interrupted
/// source cancels the migration and stops, and the destination discards what it got.
#[test]
fn a_signal_during_a_migration_leaves_one_vm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut source = Proc::spawn(
        None,
        &[
            "run",
            "--api-socket",
            sock.to_str().unwrap(),
            "--mem",
            "64M",
            "demo",
            "--",
            LONG,
            "dirty-mib=32",
        ],
    );
    wait_socket(&mut source, &sock);
    let mut c = ApiClient::connect(&sock).unwrap();
    // 1 ms of downtime hardly ever fits a guest dirtying 32 MiB: pre-copy goes on.
    let migrate = |url: &str| {
        let o = ctl(&sock, &["migrate", url, "--detach", "--downtime-ms", "1"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    };

    // The destination is interrupted: it exits, and the source's VM runs on.
    let (mut dest, url) = receiver();
    migrate(&url);
    if !wait_pre_copy(&mut c) {
        // It completed first: the VM runs at the destination only, and stops there.
        assert_eq!(source.wait(EXIT_TIMEOUT), 0, "{}", source.stderr());
        signal(&dest, StopSignal::Terminate);
        assert_eq!(dest.wait(EXIT_TIMEOUT), 143, "{}", dest.stderr());
        eprintln!("skipped: the migration converged before the signal");
        return;
    }
    signal(&dest, StopSignal::Terminate);
    assert_eq!(dest.wait(EXIT_TIMEOUT), 143, "{}", dest.stderr());
    let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
    let s = loop {
        let s = c.status().unwrap();
        if s.migration.as_ref().unwrap().phase.is_terminal() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(s.state, VmState::Running, "{s:?}");
    assert_eq!(
        s.migration.unwrap().phase,
        esvm_control::MigrationPhase::Failed
    );
    assert!(source.alive());

    // The source is interrupted: the migration is cancelled, the VM stops there, and the
    // destination discards the half-received VM and waits for another.
    let (mut dest, url) = receiver();
    migrate(&url);
    if !wait_pre_copy(&mut c) {
        assert_eq!(source.wait(EXIT_TIMEOUT), 0, "{}", source.stderr());
        signal(&dest, StopSignal::Terminate);
        assert_eq!(dest.wait(EXIT_TIMEOUT), 143, "{}", dest.stderr());
        eprintln!("skipped: the migration converged before the signal");
        return;
    }
    signal(&source, StopSignal::Terminate);
    assert_eq!(source.wait(EXIT_TIMEOUT), 143, "{}", source.stderr());
    assert!(source.stderr().contains("stopped by SIGTERM"));
    dest.wait_stderr("waiting for another", EXIT_TIMEOUT);
    assert!(dest.alive());
    assert!(!dest.stderr().contains("running it"), "{}", dest.stderr());
    assert!(!sock.exists());
}
