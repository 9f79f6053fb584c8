//! Scenario tests of the `unix:PATH` and `fd:N` migration transports with real processes:
//! the demo guest moves from `esvm run` to `esvm receive` over a Unix socket, and over a
//! connection a parent process made and handed to `esvm receive --listen fd:N`; in both
//! its output, split across the two processes, is exactly the demo's. Bad URLs and bad
//! descriptors are refused with messages that say what is wrong.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ctl, ctl_ok, esvm, text, Proc, ESVM};

const MEM: &str = "32M";
const MEM_BYTES: u64 = 32 << 20;

fn demo_args(iterations: u64) -> String {
    format!("iterations={iterations} dirty-mib=2")
}

/// `esvm run --api-socket SOCK --start-paused --mem 32M demo|sevdemo -- ARGS`.
fn source(sock: &Path, iterations: u64, sev_platform: Option<&Path>) -> Proc {
    common::paused_demo(None, sock, MEM, &demo_args(iterations), sev_platform)
}

/// Let the paused source run a little, then migrate it to `url` with `esvm ctl migrate`
/// (which must report completion); both processes end with status 0 and their output
/// together is `expected`.
fn move_and_finish(src: &mut Proc, sock: &Path, url: &str, dst: &mut Proc, expected: &str) {
    ctl_ok(sock, &["resume"]);
    std::thread::sleep(Duration::from_millis(100));
    let out = ctl_ok(sock, &["migrate", url]);
    assert!(
        out.contains(&format!("migration to {url} completed")),
        "{out}"
    );
    common::assert_halves_make_the_whole(src, dst, expected);
    assert!(
        src.stderr().contains(&format!("migrated to {url};")),
        "{}",
        src.stderr()
    );
}

/// A plain demo guest moves over `unix:PATH` (given relative to the receiver's working
/// directory: printed and used as an absolute path) and finishes exactly; the control API
/// refuses a relative unix: path and fd:N; the receiver removes its socket file.
#[test]
fn a_plain_guest_moves_over_a_unix_socket_and_finishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mig.sock");
    let url = format!("unix:{}", path.display());
    let mut cmd = Command::new(ESVM);
    cmd.current_dir(dir.path())
        .args(["receive", "--once", "--listen", "unix:mig.sock"]);
    let mut dst = Proc::spawn_command(cmd);
    let err = dst.wait_stderr("listening on ", Duration::from_secs(30));
    assert!(
        err.contains(&format!("esvm: listening on {url} for an incoming VM")),
        "{err}"
    );
    assert!(path.exists());

    let iterations = 3_000_000;
    let sock = dir.path().join("src.sock");
    let mut src = source(&sock, iterations, None);
    // Through the API directly: the VMM's working directory is not the client's.
    let mut client = esvm_control::ApiClient::connect(&sock).unwrap();
    for (bad, needle) in [
        ("unix:mig.sock", "absolute socket path"),
        ("fd:3", "esvm receive --listen fd:N"),
    ] {
        let e = client
            .call(&esvm_control::Request::Migrate(
                esvm_control::MigrateRequest::new(bad),
            ))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{bad}: {e}");
    }
    drop(client);
    let expected =
        esvm_guests::demo::expected_output(MEM_BYTES, 1, &demo_args(iterations), iterations, 2);
    move_and_finish(&mut src, &sock, &url, &mut dst, &expected);
    assert!(
        dst.stderr()
            .contains(&format!("received the VM from {url} (pid ")),
        "{}",
        dst.stderr()
    );
    assert!(!path.exists(), "the receiver removed its socket file");
}

/// An SEV-ES guest moves over `unix:PATH` between two platforms under one emulated AMD
/// root, through SEND_* / RECEIVE_*, and finishes exactly.
#[test]
fn an_sev_es_guest_moves_over_a_unix_socket_and_finishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    for p in ["p1", "p2"] {
        let platform = dir.path().join(p);
        let o = esvm(&[
            "platform",
            "init",
            "--dir",
            platform.to_str().unwrap(),
            "--amd-ca",
            ca.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }
    let path = dir.path().join("sev.sock");
    let url = format!("unix:{}", path.display());
    let p2 = dir.path().join("p2");
    let mut dst = Proc::spawn(
        None,
        &[
            "receive",
            "--once",
            "--listen",
            &url,
            "--platform",
            p2.to_str().unwrap(),
        ],
    );
    dst.wait_stderr("listening on ", Duration::from_secs(30));
    let iterations = 3_000_000;
    let sock = dir.path().join("src.sock");
    let mut src = source(&sock, iterations, Some(&dir.path().join("p1")));
    let expected =
        esvm_guests::demo::expected_output_sev(MEM_BYTES, 1, &demo_args(iterations), iterations, 2);
    move_and_finish(&mut src, &sock, &url, &mut dst, &expected);
}

/// `esvm receive --listen fd:N` with descriptor `fd` of this process as its descriptor `n`
/// (dup2 in the child before exec; the copy is not close-on-exec, as an inherited
/// descriptor is).
fn receive_on_fd(fd: RawFd, n: RawFd, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(ESVM);
    let listen = format!("fd:{n}");
    cmd.args(["receive", "--listen", &listen]).args(extra);
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and
    // fcntl, which are async-signal-safe; `fd` stays open in the parent until the child has
    // started (the caller holds it across this spawn).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let rc = if fd == n {
                libc::fcntl(n, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, n)
            };
            if rc == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Proc::spawn_command(cmd)
}

/// A management process brings its own connection: this test accepts the source VMM's
/// connection on its own Unix socket and hands the connected socket to `esvm receive
/// --listen fd:N`, which takes the migration on it without listening; the guest finishes
/// exactly. A TCP connection handed over the same way works too.
#[test]
fn receive_takes_a_connection_handed_over_as_fd_n() {
    let dir = tempfile::tempdir().unwrap();
    let iterations = 3_000_000;
    let expected =
        esvm_guests::demo::expected_output(MEM_BYTES, 1, &demo_args(iterations), iterations, 2);

    // Unix: the parent's listener, the source connects to it.
    let lpath = dir.path().join("parent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&lpath).unwrap();
    let url = format!("unix:{}", lpath.display());
    let sock = dir.path().join("src.sock");
    let mut src = source(&sock, iterations, None);
    ctl_ok(&sock, &["resume"]);
    std::thread::sleep(Duration::from_millis(100));
    let mut migrate = Proc::spawn(
        None,
        &[
            "ctl",
            "--api-socket",
            sock.to_str().unwrap(),
            "migrate",
            &url,
        ],
    );
    let (conn, _) = listener.accept().unwrap();
    let mut dst = receive_on_fd(conn.as_raw_fd(), 7, &[]);
    drop(conn);
    let err = dst.wait_stderr("receiving on", Duration::from_secs(30));
    assert!(
        err.contains("esvm: receiving on fd:7 for an incoming VM"),
        "{err}"
    );
    assert_eq!(
        migrate.wait(Duration::from_secs(60)),
        0,
        "{}",
        migrate.stderr()
    );
    assert!(
        migrate.stdout().contains("completed"),
        "{}",
        migrate.stdout()
    );
    assert_eq!(src.wait(Duration::from_secs(30)), 0, "{}", src.stderr());
    assert_eq!(dst.wait(Duration::from_secs(120)), 0, "{}", dst.stderr());
    assert!(
        dst.stderr().contains("received the VM from fd:7"),
        "{}",
        dst.stderr()
    );
    assert_eq!(src.stdout() + &dst.stdout(), expected);

    // TCP, the guest migrated before it ran.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", tcp.local_addr().unwrap());
    let sock = dir.path().join("src2.sock");
    let mut src = source(&sock, iterations, None);
    let mut migrate = Proc::spawn(
        None,
        &[
            "ctl",
            "--api-socket",
            sock.to_str().unwrap(),
            "migrate",
            &url,
        ],
    );
    let (conn, _) = tcp.accept().unwrap();
    let mut dst = receive_on_fd(conn.as_raw_fd(), 9, &[]);
    drop(conn);
    assert_eq!(
        migrate.wait(Duration::from_secs(60)),
        0,
        "{}",
        migrate.stderr()
    );
    assert_eq!(src.wait(Duration::from_secs(30)), 0, "{}", src.stderr());
    // It was paused at the source, so it arrives paused; without --api-socket it runs.
    assert_eq!(dst.wait(Duration::from_secs(120)), 0, "{}", dst.stderr());
    assert_eq!(src.stdout(), "");
    assert_eq!(dst.stdout(), expected);
}

/// A connection whose peer is not an esvm source ends the receiver (no waiting for
/// another: the descriptor carried the one migration), status 125, with the reason.
#[test]
fn a_failed_migration_on_fd_n_ends_the_receiver() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut dst = receive_on_fd(theirs.as_raw_fd(), 5, &[]);
    drop(theirs);
    dst.wait_stderr("receiving on fd:5", Duration::from_secs(30));
    use std::io::Write;
    (&ours).write_all(&[0x55; 64]).unwrap();
    ours.shutdown(std::net::Shutdown::Write).unwrap();
    let status = dst.wait(Duration::from_secs(30));
    assert_eq!(status, 125, "{}", dst.stderr());
    assert!(
        dst.stderr()
            .contains("the incoming migration from fd:5 failed")
            && dst.stderr().contains("not an esvm migration stream"),
        "{}",
        dst.stderr()
    );
}

/// Bad URLs and descriptors are refused before anything happens, each with what is wrong.
#[test]
fn bad_urls_and_descriptors_are_refused_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    // The help says which URLs each command takes.
    let help = text(&esvm(&["receive", "--help"]).stdout);
    assert!(
        help.contains("unix:PATH") && help.contains("fd:N") && help.contains("inherited"),
        "{help}"
    );
    let help = text(&esvm(&["ctl", "migrate", "--help"]).stdout);
    assert!(
        help.contains("unix:PATH") && help.contains("fd:N is refused"),
        "{help}"
    );
    // Usage errors (status 120): malformed URLs, fd 0..2, fd: for migrate.
    for (args, needle) in [
        (
            vec!["receive", "--listen", "udp://h:1"],
            "unix:PATH (a Unix socket",
        ),
        (vec!["receive", "--listen", "unix:"], "needs a path"),
        (vec!["receive", "--listen", "fd:1"], "3 or more"),
        (vec!["receive", "--listen", "fd:x"], "3 or more"),
    ] {
        let o = esvm(&args);
        assert_eq!(o.status.code(), Some(120), "{args:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(needle),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
    let o = ctl(&dir.path().join("none.sock"), &["migrate", "fd:3"]);
    assert_eq!(o.status.code(), Some(120), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("fd:N hands `esvm receive --listen fd:N`"),
        "{}",
        text(&o.stderr)
    );

    // A file that is not a socket at the unix: path is left alone.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep").unwrap();
    let o = esvm(&["receive", "--listen", &format!("unix:{}", file.display())]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("the file exists and is not a socket"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");

    // Descriptors: not open, a regular file, a listening socket.
    let o = esvm(&["receive", "--listen", "fd:250"]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("fd:250 is not an open file descriptor"),
        "{}",
        text(&o.stderr)
    );
    let f = std::fs::File::open(&file).unwrap();
    let mut p = receive_on_fd(f.as_raw_fd(), 6, &[]);
    assert_eq!(p.wait(Duration::from_secs(30)), 125, "{}", p.stderr());
    assert!(
        p.stderr().contains("fd:6 is a regular file, not a socket"),
        "{}",
        p.stderr()
    );
    let l = std::os::unix::net::UnixListener::bind(dir.path().join("l.sock")).unwrap();
    let started = Instant::now();
    let mut p = receive_on_fd(l.as_raw_fd(), 6, &[]);
    assert_eq!(p.wait(Duration::from_secs(30)), 125, "{}", p.stderr());
    assert!(
        p.stderr().contains("not connected (a listening socket?)"),
        "{}",
        p.stderr()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it did not wait"
    );
}
